"""User-facing errors: the CLI prints their message on one line and exits 2, the server answers 4xx."""


class PerfxError(Exception):
    """A problem with the user's input (path, file, model, prompt) rather than a bug in perfxllm."""


class ModelLoadError(PerfxError):
    pass


class UnsupportedError(PerfxError):
    pass


class RequestError(PerfxError):
    """A request the engine cannot take (e.g. a prompt longer than the context)."""


def shown(value: object, limit: int = 40) -> str:
    """A value as an error message quotes it: its repr, cut short (a corrupt field can be a long array)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
