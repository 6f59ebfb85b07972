class LLMPressError(Exception):
    """A problem with the user's input (model, data, plan, options), reported before heavy work."""
