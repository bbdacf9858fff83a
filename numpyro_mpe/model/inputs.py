"""The model's data as the leaves and static parts of a pytree.

:func:`convert_inputs` turns pandas objects (and observed lists of numbers) into NumPy arrays, as NumPyro's
own inference expects; :class:`DataBinding` splits ``(args, kwargs)`` into array leaves, which every compiled
program takes as arguments, and static leaves, which are part of the program's structure.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.errors import ModelError


class Opaque:
    """A static leaf that cannot be hashed (compared by identity)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def static_leaf(x):
    """``x`` itself when it can be hashed (part of a program's static structure), else :class:`Opaque`."""
    try:
        hash(x)
        return x
    except TypeError:
        return Opaque(x)


def is_array(x) -> bool:
    """Whether ``x`` is a numeric array (NumPy or JAX): a leaf passed to compiled programs."""
    return (hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, bool)
            and np.dtype(x.dtype).kind in "biufc")


class DataBinding(NamedTuple):
    """The structure of the model's data ``(args, kwargs)``: its treedef, the leaves that are not arrays
    (Python ints, strings, None, ...: static) and the positions of the array leaves (arguments of every
    compiled program, so that XLA neither embeds nor constant-folds them and compile time does not grow
    with N).  Float scalars count as arrays (a prior scale can change without a new program)."""

    treedef: Any
    static: tuple  # the non-array leaves, None where an array leaf goes
    dynamic: tuple  # positions of the array leaves

    @classmethod
    def of(cls, args: tuple, kwargs: dict, floats_static: bool = False) -> tuple[DataBinding, tuple]:
        leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
        dyn = tuple(i for i, x in enumerate(leaves)
                    if is_array(x) or (not floats_static and isinstance(x, float)))
        static = tuple(None if i in dyn else static_leaf(x) for i, x in enumerate(leaves))
        values = tuple(jnp.asarray(leaves[i]) for i in dyn)
        return cls(treedef, static, dyn), values

    def rebuild(self, values) -> tuple:
        leaves = [x.obj if isinstance(x, Opaque) else x for x in self.static]
        for i, v in zip(self.dynamic, values):
            leaves[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)



def argument_name(path) -> str:
    """``y`` or ``args[0]`` from a pytree path into ``(args, kwargs)``."""
    first = path[0].idx if hasattr(path[0], "idx") else 0
    rest = path[1:]
    if first == 1 and rest and hasattr(rest[0], "key"):
        label, rest = str(rest[0].key), rest[1:]
    elif rest and hasattr(rest[0], "idx"):
        label, rest = f"args[{rest[0].idx}]", rest[1:]
    else:
        label = "args"
    return label + "".join(str(p) for p in rest)


def _is_pandas(x) -> bool:
    return type(x).__module__.startswith("pandas") and hasattr(x, "to_numpy")


def convert_inputs(args: tuple, kwargs: dict, lists: tuple = ()) -> tuple[tuple, dict]:
    """The model's data with pandas objects (and the arguments at the paths ``lists``) as NumPy arrays.

    NumPyro's own inference takes arrays: a ``pandas.Series`` (also one with a filtered, non-contiguous
    index) or a ``DataFrame`` of numbers becomes its values; one that is not numeric is refused with an error
    naming the argument.  ``lists``: paths of lists of numbers that the model observes (found by
    :func:`~numpyro_mpe.model.structure.trace_structure`), converted to arrays.
    """

    def convert(path, x):
        if _is_pandas(x):
            arr = x.to_numpy()
            if arr.dtype.kind not in "biuf":
                kind = getattr(x, "dtype", arr.dtype)  # pandas' own dtype (category, str) where it has one
                raise ModelError(f"argument '{argument_name(path)}' is a pandas {type(x).__name__} of dtype "
                                 f"{kind}; pass numbers (e.g. its .cat.codes, or a float column)")
            return arr
        if path in lists:
            try:
                arr = np.asarray(x)
            except ValueError:
                arr = np.asarray(x, dtype=object)
            if arr.dtype.kind not in "biuf":
                raise ModelError(f"argument '{argument_name(path)}' is a {type(x).__name__} that is not "
                                 f"a rectangular array of numbers; pass a NumPy array")
            return arr
        return x

    def stop(x):
        return _is_pandas(x) or isinstance(x, list | tuple) and any(x is v for v in listed)

    listed: list = []
    if lists:  # the objects at those paths, to stop the traversal there
        for path, leaf in jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)),
                                                              is_leaf=lambda v: isinstance(v, list))[0]:
            if path in lists:
                listed.append(leaf)
    out = jax.tree_util.tree_map_with_path(convert, (tuple(args), dict(kwargs)), is_leaf=stop)
    return out[0], out[1]
