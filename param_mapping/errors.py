"""The one client-error type of the translation layer."""


class ParameterError(ValueError):
    """A request value that cannot be served; the HTTP layer answers 400.

    ``parameter`` names the offending field (``generate_kwargs.top_p``), and the
    message says the rule and the value, as vLLM's ``VLLMValidationError`` does.
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message
