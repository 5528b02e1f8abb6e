from django.apps import AppConfig


class LlmJobsConfig(AppConfig):
    name = "llmjobs"
    verbose_name = "LLM jobs"
