"""The one exception type for bad input, so callers can catch it."""


class CVFastInputError(ValueError):
    """Raised for an argument cvfast cannot take; the message names the argument, its value and what
    is accepted. Raised before any heavy work (weights, denoising) starts."""


class NonFiniteLatentsError(CVFastInputError):
    """Latents became NaN/Inf during denoising; raised instead of writing a black video."""


def bad_arg(name: str, value, accepted: str) -> CVFastInputError:
    return CVFastInputError(f"{name}={value!r} is not accepted: {accepted}")
