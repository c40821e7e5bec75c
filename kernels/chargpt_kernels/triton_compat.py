"""What the Triton modules need to run on every supported torch/triton pair (torch >= 2.11, triton >= 3.6),
kept apart from the kernels themselves."""

import torch

from chargpt_kernels.runtime import triton_interpreted


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`, except that under TRITON_INTERPRET=1 the kernel is returned as is.

    An interpreted kernel has none of the JIT metadata the traceable wrapper needs, but launches eagerly. torch
    2.14 passes such kernels through itself; torch 2.11 raises "wrap_triton only works on functions annotated
    with triton.jit or triton.autotune" for an interpreted @triton.jit kernel."""
    if triton_interpreted():
        return kernel
    return torch.library.wrap_triton(kernel)


def refuse_double_backward(backward_op, name):
    """Make differentiating `backward_op` (a second derivative) raise a clear error instead of torch's "no autograd
    formula was registered". First-order backward runs with grad mode off and never reaches this."""

    def refuse(ctx, *grads):
        raise RuntimeError(f"{name}: double backward is not supported (use the eager backend for second derivatives)")

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


def fix_interpreter_loop_bounds():
    """Let `range(lo, hi, BLOCK)` take tensor bounds under TRITON_INTERPRET=1 with NumPy >= 2.4.

    The interpreter holds a scalar as a 1-element array and converts a loop bound with `int(array)`, which NumPy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.8 squeezes the array
    first, triton 3.6 does not. This probes the installed interpreter's conversion and, only where it fails,
    wraps its tensor patching to squeeze as newer Triton does. A no-op off the interpreter, where the probe
    passes, or where the interpreter's internals differ from what is expected here."""
    if not triton_interpreted():
        return
    import operator
    import types

    import numpy as np
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_type is None or getattr(patch, "squeezes_index", False):
        return

    class Probe:
        pass

    scope = scope_type()
    try:
        patch(Probe, scope)
        probe = Probe()
        probe.handle = types.SimpleNamespace(data=np.ones(1, dtype=np.int32))
        operator.index(probe)
        return  # this interpreter (or this NumPy) already converts 1-element arrays
    except TypeError:
        pass  # the NumPy 2.4 refusal: squeeze below
    except Exception:  # noqa: BLE001 - internals not as expected: leave the interpreter alone
        return
    finally:
        scope.restore()

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
