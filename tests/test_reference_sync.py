"""TR-DPO reference synchronisation (`jaxpt.reference_sync`) against TRL's `SyncRefModelCallback` and float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.callbacks import SyncRefModelCallback  # a test dependency: parity must fail, never skip, without it

from jaxpt.reference_sync import mix_reference, sync_reference


class Settings:
    sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps = True, 0.6, 3


def trees(seed=0):
    rng = np.random.default_rng(seed)
    reference = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    policy = {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in reference.items()}
    return reference, policy


@pytest.mark.parametrize("alpha", [0.6, 0.05, 1.0])
def test_mixup_matches_trl_callback_and_float64(alpha):
    reference, policy = trees()
    torch_reference, torch_policy = torch.nn.ParameterList(), torch.nn.ParameterList()
    for name in ("w", "b"):
        torch_reference.append(torch.nn.Parameter(torch.tensor(reference[name])))
        torch_policy.append(torch.nn.Parameter(torch.tensor(policy[name])))
    SyncRefModelCallback._sync_target_model(torch_policy, torch_reference, alpha)

    mixed = mix_reference({k: jnp.asarray(v) for k, v in reference.items()},
                          {k: jnp.asarray(v) for k, v in policy.items()}, alpha)
    for i, name in enumerate(("w", "b")):
        expected = alpha * policy[name].astype(np.float64) + (1 - alpha) * reference[name].astype(np.float64)
        assert mixed[name].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(mixed[name], np.float64), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(mixed[name]), torch_reference[i].detach().numpy(), rtol=1e-6,
                                   atol=1e-7)
        assert np.abs(expected - reference[name]).max() > 1e-2 or alpha == 0.0


def test_sync_happens_after_every_ref_model_sync_steps_th_step_only():
    reference, policy = trees()
    reference = {k: jnp.asarray(v) for k, v in reference.items()}
    policy = {k: jnp.asarray(v) for k, v in policy.items()}
    for step in (1, 2, 4, 5):
        assert sync_reference(reference, policy, Settings, step=step) is reference
    before = {k: np.asarray(v) for k, v in reference.items()}
    synced = sync_reference(reference, policy, Settings, step=6)
    assert synced is not reference
    np.testing.assert_allclose(np.asarray(synced["w"]), 0.6 * np.asarray(policy["w"]) + 0.4 * before["w"], rtol=1e-6)
    bf16 = mix_reference({"w": jnp.asarray(before["w"], jnp.bfloat16)}, {"w": policy["w"]}, 0.5)
    assert bf16["w"].dtype == jnp.bfloat16  # the reference keeps its dtype
    assert jax.tree.structure(synced) == jax.tree.structure(policy)
