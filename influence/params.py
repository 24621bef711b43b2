"""Which weights the influence is taken with respect to.

All trainable weights by default. Restricting to the top layers (``fc2,predictions`` of
VGG16, or the last ``k`` layers with weights) is what Koh & Liang did for large image
models: the Hessian is then that of the top layers with the features below held fixed,
and every Hessian-vector product and score stops back-propagating at those layers.
"""

from __future__ import annotations

from typing import Sequence

import keras

from influence.errors import UserError


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` that own trainable weights, in order, nested models opened."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(weighted_layers(layer))
        elif layer.trainable_weights:
            found.append(layer)
    return found


def _unique(variables) -> list:
    seen, unique = set(), []
    for variable in variables:
        if id(variable) not in seen:  # a shared layer contributes its weights once
            seen.add(id(variable))
            unique.append(variable)
    return unique


def _layer_names(layers: str | Sequence[str]) -> list[str]:
    names = layers.split(",") if isinstance(layers, str) else list(layers)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise UserError(f"no layer names in {layers!r}; give names like 'fc2,predictions'")
    return names


def select(model: keras.Model, layers: str | Sequence[str] | None = None,
           last: int | None = None) -> list:
    """The trainable keras Variables to take influence with respect to, in a stable order.

    ``layers``: None (all trainable weights), ``"fc2,predictions"`` or a list of layer names;
    ``last``: the last ``k`` layers that have trainable weights. At most one of the two.
    Order: layers as the model lists them, then each layer's own weight order.
    """
    if layers is not None and last is not None:
        raise UserError("choose the layers by name or by count (last k), not both")
    candidates = weighted_layers(model)
    if layers is not None:
        by_name = {layer.name: layer for layer in candidates}
        wanted = set(_layer_names(layers))
        unknown = sorted(wanted - set(by_name))
        if unknown:
            raise UserError(f"no layer with trainable weights named {', '.join(map(repr, unknown))} "
                            f"in model {model.name!r}; valid: {', '.join(by_name)}")
        chosen = [layer for layer in candidates if layer.name in wanted]
    elif last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= len(candidates):
            raise UserError(f"last={last!r} layers: model {model.name!r} has {len(candidates)} "
                            f"layers with trainable weights, so give 1 to {len(candidates)}")
        chosen = candidates[-last:]
    else:
        variables = _unique(model.trainable_variables)
        if not variables:
            raise UserError(f"model {model.name!r} has no trainable weights")
        return variables
    return _unique(variable for layer in chosen for variable in layer.trainable_weights)


def count(variables) -> int:
    """Number of scalar parameters in ``variables``."""
    total = 0
    for variable in variables:
        size = 1
        for dim in variable.shape:
            size *= int(dim)
        total += size
    return total
