"""cvfast's exception types: what went wrong decides the type, so callers (and the CLI's exit code)
can tell a bad argument from a failed computation.

    CVFastError                       every error cvfast raises on purpose
      CVFastInputError (ValueError)   an argument, file or model cvfast cannot take; raised before any
        WeightError                     heavy work starts, the message naming the argument, its value
        LoRAError                       and what is accepted (subclasses say which kind of input)
        UnsafePickleError
        EngineMismatchError
      NumericsError (RuntimeError)    a computation produced NaN/Inf
        NonFiniteLatentsError           ...in the denoising loop or the VAE decode: no video is written
      ExportError (RuntimeError)      an exported ONNX model cannot be vouched for
        ONNXExportError                 ...its written signature is not the expected one
        ONNXCheckError                  ...it does not match the reference forward within the bound
      RankFailedError (RuntimeError)  another rank of a parallel job failed
      OutputError (OSError)           a file could not be written; the previous one is unchanged
"""


class CVFastError(Exception):
    """Base of every error cvfast raises on purpose."""


class CVFastInputError(CVFastError, ValueError):
    """An argument cvfast cannot take; the message names the argument, its value and what is
    accepted. Raised before any heavy work (weights, denoising) starts."""


class WeightError(CVFastInputError):
    """A checkpoint does not match the model it is loaded into."""


class LoRAError(CVFastInputError):
    """An adapter that does not fit the loaded model; the message lists what did not match."""


class UnsafePickleError(CVFastInputError):
    """A pickle holds a global outside the allowlist; loading it anyway needs trust_pickle=True."""


class EngineMismatchError(CVFastInputError):
    """A TensorRT engine built for another model, size or precision than asked."""


class NumericsError(CVFastError, RuntimeError):
    """A computation produced non-finite values."""


class NonFiniteLatentsError(NumericsError):
    """Latents became NaN/Inf during denoising, or the VAE decoded NaN/Inf; raised instead of writing a
    black video."""


class ExportError(CVFastError, RuntimeError):
    """An export cvfast cannot vouch for."""


class ONNXExportError(ExportError):
    """The exporter produced something cvfast cannot vouch for (e.g. a batch dimension fixed to 1)."""


class ONNXCheckError(ExportError):
    """The exported model does not match the reference forward within the bound."""


class RankFailedError(CVFastError, RuntimeError):
    """Another rank of the parallel job failed; the message is that rank's error."""


class OutputError(CVFastError, OSError):
    """A file could not be written (a full disk, a writer that failed); nothing was written in place,
    so the previous file at that path is unchanged."""


def bad_arg(name: str, value, accepted: str) -> CVFastInputError:
    """The error for argument `name` (a Python argument, or the flag the user typed) of `value`."""
    return CVFastInputError(f"{name}={value!r} is not accepted: {accepted}")
