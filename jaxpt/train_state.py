"""`TrainState`: the pytree every method's jitted step takes and returns.

The pattern every `make_train_step` follows (Flax's functional NNX style):

```python
state = TrainState.create(model, optax.adamw(1e-5), mesh=mesh)   # nnx.split -> (graphdef, params)
state_sharding = state.shardings(mesh)                           # NamedSharding per leaf, from the
                                                                 # family's partition rules
def step(state, batch):
    def loss_fn(params):
        model = nnx.merge(state.graphdef, params)
        return my_loss(model, batch)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads), metrics

step = jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh)),
               out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)
```
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpt.sharding import PartitionRules, batch_sharding, path_name, replicated, tree_shardings


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimizer state and step counter; the graphdef and optimizer are static.

    `params` are the trained parameters: all of them, or with LoRA adapters (`jaxpt.lora.apply_lora`) only the
    adapters (and `modules_to_save`). The base parameters then sit in `frozen`: no gradient, no optimizer state,
    never changed. A step differentiates `state.params` and builds the model from `state.full_params(params)`.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    partition_rules: PartitionRules = flax.struct.field(pytree_node=False, default=())
    frozen: nnx.State | None = None  # the base parameters under LoRA; None when every parameter trains

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ) -> TrainState:
        """Split `model` into graphdef + params and initialise the optimizer.

        A model with LoRA adapters trains only them (`jaxpt.lora.trainable_filter`): the rest of its parameters
        go to `frozen`, and the optimizer state covers the adapters alone.

        With a `mesh`, parameters and optimizer state are laid out by the model's partition rules
        (parameters already placed by `from_pretrained(mesh=...)` stay where they are).

        An abstract `model` (`nnx.eval_shape(lambda: from_config(...))`) gives an abstract state: every leaf a
        `jax.ShapeDtypeStruct` (with its `NamedSharding` when a `mesh` is given), nothing allocated. That is what
        `step.lower(state, batch).compile()` needs to plan a run before any weights exist (`jaxpt.plan`).
        """
        from jaxpt.lora import trainable_filter
        from jaxpt.quantize import check_trainable

        check_trainable(model)  # a quantized base trains only through adapters
        graphdef, params, frozen, rest = nnx.split(model, trainable_filter(model), nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            is_variable = lambda x: isinstance(x, nnx.Variable)
            kinds = {type(v).__name__ for v in jax.tree_util.tree_leaves(rest, is_leaf=is_variable)}
            raise ValueError(f"TrainState holds only nnx.Param state, but the model has other state: {sorted(kinds)}.")
        frozen = frozen if jax.tree_util.tree_leaves(frozen) else None
        rules = tuple(getattr(model, "partition_rules", ()))

        def init(params, frozen):
            return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       graphdef=graphdef, tx=optimizer, partition_rules=rules, frozen=frozen)

        leaves = jax.tree_util.tree_leaves((params, frozen))
        is_abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        if mesh is None:
            return jax.eval_shape(init, params, frozen) if is_abstract else init(params, frozen)
        abstract = jax.eval_shape(init, params, frozen)
        shardings = tree_shardings(abstract, mesh, rules)
        if is_abstract:
            return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                                abstract, shardings)
        # the frozen base is placed once, outside the jit (no copy of it is made)
        frozen = None if frozen is None else jax.device_put(frozen, shardings.frozen)
        state = jax.jit(lambda params: init(params, None), in_shardings=(shardings.params,),
                        out_shardings=shardings.replace(frozen=None))(params)
        return state.replace(frozen=frozen)

    def full_params(self, params: nnx.State | None = None) -> nnx.State:
        """Every parameter of the model: `params` (default: the state's trained ones; inside a loss, the ones
        being differentiated) with the frozen base, what `nnx.merge(state.graphdef, ...)` needs."""
        params = self.params if params is None else params
        return params if self.frozen is None else nnx.merge_state(self.frozen, params)

    def model(self) -> nnx.Module:
        """The model with the current parameters (inside a jitted step: traced ones)."""
        return nnx.merge(self.graphdef, self.full_params())

    def apply_gradients(self, grads: nnx.State, **replacements: Any) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **replacements)

    def shardings(self, mesh: jax.sharding.Mesh | None):
        """A `NamedSharding` per leaf (params and optimizer moments by the partition rules), or None."""
        if mesh is None:
            return None
        return tree_shardings(self, mesh, self.partition_rules)


def learning_rate_schedule(config, num_training_steps: int):
    """transformers' schedules (`get_scheduler`) as a function of the optimizer step, for an optax optimizer.

    `lr(step)` for the update that step `step` (0-based) applies: linear warm-up from 0 over the warm-up steps,
    then `linear` (to 0 at `num_training_steps`), `cosine` (half a cosine to 0), `cosine_with_min_lr` (to
    `min_lr_rate * learning_rate`), `constant`, or `constant_with_warmup`.
    """
    peak = config.learning_rate
    total = max(int(num_training_steps), 1)
    warmup = config.warmup_steps if config.warmup_steps > 0 else math.ceil(total * config.warmup_ratio)
    kind = config.lr_scheduler_type

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "linear":
            after = jnp.maximum(0.0, (total - step) / max(total - warmup, 1))
        elif kind == "cosine":
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "cosine_with_min_lr":
            after = config.min_lr_rate + (1 - config.min_lr_rate) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind in ("constant", "constant_with_warmup"):
            after = jnp.ones_like(step)
        else:
            raise ValueError(f"lr_scheduler_type={kind!r} is not supported.")
        if kind == "constant":
            return peak * after
        return peak * jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(params):
    """True for parameters AdamW decays: not biases, not norm weights (transformers' Trainer rule)."""

    def decays(path, _):
        name = path_name(path)
        last_module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        return not (name.endswith("bias") or "norm" in last_module)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, num_training_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with the config's schedule, betas, epsilon, weight decay and global-norm clipping, as TRL's
    default `adamw_torch` optimizer. Returns `(optimizer, schedule)`; the schedule gives the logged
    `learning_rate`."""
    schedule = learning_rate_schedule(config, num_training_steps)
    adamw = optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.max_grad_norm and config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule
    return adamw, schedule


def jit_step(step, *, mesh: jax.sharding.Mesh | None, state_sharding: Any, train: bool = True,
             extra_in_shardings: tuple = ()):
    """The jitted step every method's `make_train_step` / `make_eval_step` returns, for
    `step(state, batch, *extra)` with `batch` arrays shaped `[accumulation, micro_batch, ...]`.

    `train`: returns `(state, metrics)` with the state donated; otherwise only metrics. On a mesh the state
    keeps `state_sharding`, the micro-batch dimension splits over `("data", "fsdp")`, metrics come back
    replicated, `extra_in_shardings` place the extra arguments (e.g. reference parameters), and the step is
    traced inside the mesh's abstract context so the models' activation sharding hints apply.

    A LoRA state's frozen base (`state.frozen`) goes in beside the state and is not donated: it comes back as the
    very arrays that went in (no copy), and whatever else holds them (a reference, the sampler) stays valid.
    The returned step has `.lower(state, batch, *extra)` like a `jax.jit` function.
    """
    donate = (0,) if train else ()

    def split_step(trained, frozen, batch, *extra):
        out = step(trained.replace(frozen=frozen), batch, *extra)
        if not train:
            return out
        state, metrics = out
        return state.replace(frozen=None), metrics

    if mesh is None:
        return FrozenApartStep(jax.jit(split_step, donate_argnums=donate), train=train)
    if state_sharding is None:
        raise ValueError("make_train_step(mesh=...) needs state_sharding=state.shardings(mesh).")

    def step_in_mesh(trained, frozen, batch, *extra):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return split_step(trained, frozen, batch, *extra)

    metrics = replicated(mesh)
    trained_sharding = state_sharding.replace(frozen=None)
    jitted = jax.jit(step_in_mesh, in_shardings=(trained_sharding, state_sharding.frozen,
                                                 batch_sharding(mesh, batch_axis=1), *extra_in_shardings),
                     out_shardings=(trained_sharding, metrics) if train else metrics, donate_argnums=donate)
    return FrozenApartStep(jitted, train=train)


class FrozenApartStep:
    """`step(state, batch, *extra)` calling a jitted `step(state without frozen, frozen, batch, *extra)`."""

    def __init__(self, jitted, *, train: bool):
        self.jitted = jitted
        self.train = train

    def __call__(self, state: TrainState, batch: Any, *extra: Any):
        out = self.jitted(state.replace(frozen=None), state.frozen, batch, *extra)
        if not self.train:
            return out
        new_state, metrics = out
        return new_state.replace(frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: Any, *extra: Any):
        return self.jitted.lower(state.replace(frozen=None), state.frozen, batch, *extra)
