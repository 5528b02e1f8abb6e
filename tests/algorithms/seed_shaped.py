"""A plug-in shaped like the seed's ``tbg_llm_example``: a module exposing ``Algorithm``
whose constructor takes no arguments at all."""


class Algorithm:
    def __init__(self):
        self.calls = 0

    def run(self, input_text):
        self.calls += 1
        return input_text.upper()


class NotRunnable:
    run = "not a method"


class NeedsModelPath:
    def __init__(self, model_path, device="cpu"):
        self.model_path = model_path
        self.device = device

    def run(self, input_text):
        return self.model_path


class TakesAnyOption:
    def __init__(self, **options):
        self.options = options

    def run(self, input_text):
        return dict(self.options)


class FailsToLoad:
    def __init__(self, device="cpu"):
        raise RuntimeError("weights are corrupt")

    def run(self, input_text):
        return input_text


not_a_class = Algorithm()
