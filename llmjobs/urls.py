from django.urls import path

from llmjobs import views

urlpatterns = [
    path("api/", views.RunView.as_view(), name="run"),
    path("analyze/", views.RunView.as_view(), name="analyze"),
    path("api/jobs/", views.JobCreateView.as_view(), name="job-create"),
    path("api/jobs/<uuid:job_id>/", views.JobDetailView.as_view(), name="job-detail"),
    path("api/usage/", views.UsageView.as_view(), name="usage"),
]
