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

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpt.sharding import PartitionRules, replicated, tree_shardings


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimizer state and step counter; the graphdef and optimizer are static."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    partition_rules: PartitionRules = flax.struct.field(pytree_node=False, default=())

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ) -> TrainState:
        """Split `model` into graphdef + params and initialise the optimizer.

        With a `mesh`, parameters and optimizer state are laid out by the model's partition rules
        (parameters already placed by `from_pretrained(mesh=...)` stay where they are).
        """
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            is_variable = lambda x: isinstance(x, nnx.Variable)
            kinds = {type(v).__name__ for v in jax.tree_util.tree_leaves(rest, is_leaf=is_variable)}
            raise ValueError(f"TrainState holds only nnx.Param state, but the model has other state: {sorted(kinds)}.")
        rules = tuple(getattr(model, "partition_rules", ()))

        def init(params):
            return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       graphdef=graphdef, tx=optimizer, partition_rules=rules)

        if mesh is None:
            return init(params)
        abstract = jax.eval_shape(init, params)
        shardings = tree_shardings(abstract, mesh, rules)
        return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)

    def model(self) -> nnx.Module:
        """The model with the current parameters (inside a jitted step: traced ones)."""
        return nnx.merge(self.graphdef, self.params)

    def apply_gradients(self, grads: nnx.State, **replacements: Any) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **replacements)

    def shardings(self, mesh: jax.sharding.Mesh | None):
        """A `NamedSharding` per leaf (params and optimizer moments by the partition rules), or None."""
        if mesh is None:
            return None
        return tree_shardings(self, mesh, self.partition_rules)


def metrics_sharding(mesh: jax.sharding.Mesh | None):
    """Out-sharding for a step's metrics dict: replicated scalars (None without a mesh)."""
    return None if mesh is None else replicated(mesh)
