"""Value, gradient and Hessian of a scalar function from one trace of it.

``jax.value_and_grad(f)`` and ``jax.hessian(f)`` side by side trace ``f`` twice (reverse mode, then forward
over reverse), and the program holds both copies; every Newton oracle of the package (the Laplace MAP, the
streamed MAP, the brute-force refits) and every per-observation memory needs all three.  Forward over reverse
with the value and the gradient carried out as auxiliary outputs gives them from one trace: the same
arithmetic, a smaller program to trace, lower and compile.
"""

from __future__ import annotations

from collections.abc import Callable

import jax


def value_grad_hessian(fn: Callable) -> Callable:
    """``vgh(x, *args) -> (f, ∇f, ∇²f)`` of a scalar ``fn(x, *args)`` in its first argument, from one trace.

    ∇²f = ∂(∇f)/∂x by forward mode over the reverse-mode gradient (as ``jax.hessian``); f and ∇f are the
    primal outputs of that same pass.  The Hessian is not symmetrized.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f, g, h = value_grad_hessian(lambda x, a: a * jnp.sum(x ** 3))(jnp.array([1.0, 2.0]), 2.0)
    >>> float(f), g.tolist(), h.tolist()
    (18.0, [6.0, 24.0], [[12.0, 0.0], [0.0, 24.0]])
    """

    def grad_with_value(x, *args):
        value, grad = jax.value_and_grad(fn)(x, *args)
        return grad, (value, grad)

    def vgh(x, *args):
        hess, (value, grad) = jax.jacfwd(grad_with_value, has_aux=True)(x, *args)
        return value, grad, hess

    return vgh
