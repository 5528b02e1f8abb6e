"""The admin shows a new key once, right after "add", and never again."""

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from apikeys.keys import hash_secret
from apikeys.models import ApiKey

pytestmark = pytest.mark.django_db


def test_add_shows_the_key_once_and_only_in_the_page(admin_client):
    response = admin_client.post(
        "/admin/apikeys/apikey/add/",
        {
            "name": "team",
            "owner_email": "t@example.com",
            "note": "",
            "max_calls": "5",
            "weight": "1",
        },
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    api_key = ApiKey.objects.get()
    page = response.content.decode()
    start = page.index(f"dla_{api_key.prefix}_")
    plaintext = page[start:].split("<", 1)[0]
    secret = plaintext.split("_", 2)[2]
    assert api_key.secret_hash == hash_secret(secret)
    # Not in a cookie (the default message storage), nor anywhere afterwards.
    assert all(secret not in morsel.value for morsel in response.cookies.values())
    listing = admin_client.get("/admin/apikeys/apikey/").content.decode()
    change = admin_client.get(f"/admin/apikeys/apikey/{api_key.id}/change/").content.decode()
    assert secret not in listing and secret not in change
    assert api_key.prefix in listing
    assert "0 / 5" in listing


def test_editing_a_key_keeps_calls_consumed_meanwhile(admin_client):
    api_key, _ = ApiKey.objects.issue(name="a", max_calls=10)
    form = admin_client.get(f"/admin/apikeys/apikey/{api_key.id}/change/")
    assert form.status_code == 200
    ApiKey.objects.filter(id=api_key.id).update(calls_used=7)  # calls served while the form was open
    admin_client.post(
        f"/admin/apikeys/apikey/{api_key.id}/change/",
        {"name": "renamed", "owner_email": "", "note": "", "max_calls": "10", "weight": "1"},
    )
    api_key.refresh_from_db()
    assert (api_key.name, api_key.calls_used) == ("renamed", 7)


def test_revoke_and_reset_actions(admin_client):
    api_key, _ = ApiKey.objects.issue(name="a", max_calls=3)
    ApiKey.objects.filter(id=api_key.id).update(calls_used=3)
    admin_client.post("/admin/apikeys/apikey/", {"action": "reset_calls", "_selected_action": [api_key.id]})
    api_key.refresh_from_db()
    assert api_key.calls_used == 0
    admin_client.post("/admin/apikeys/apikey/", {"action": "revoke", "_selected_action": [api_key.id]})
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None and api_key.status() == "revoked"


def test_jobs_are_listed_read_only(admin_client):
    from llmjobs.models import Job

    api_key, _ = ApiKey.objects.issue(name="a")
    job = Job.objects.create(api_key=api_key, model="echo", input_text="hi", input_chars=2)
    listing = admin_client.get("/admin/llmjobs/job/")
    assert listing.status_code == 200 and "echo" in listing.content.decode()
    assert admin_client.get("/admin/llmjobs/job/add/").status_code == 403
    detail = admin_client.get(f"/admin/llmjobs/job/{job.id}/change/")
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()


def test_allowed_models_are_picked_from_the_configured_models(admin_client):
    page = admin_client.get("/admin/apikeys/apikey/add/").content.decode()
    for name in settings.LLM_CONFIG.model_names:
        assert f'name="allowed_models" value="{name}"' in page
    fields = {"name": "x", "owner_email": "", "note": "", "max_calls": "", "weight": "1"}
    response = admin_client.post("/admin/apikeys/apikey/add/", {**fields, "allowed_models": ["echo", "words"]})
    assert response.status_code == 200 and ApiKey.objects.get().allowed_models == ["echo", "words"]


@pytest.mark.parametrize("value", ["nosuchmodel", '["echo"]', ""])
def test_a_model_that_is_not_configured_cannot_be_picked(admin_client, value):
    response = admin_client.post(
        "/admin/apikeys/apikey/add/",
        {"name": "x", "owner_email": "", "note": "", "max_calls": "", "weight": "1", "allowed_models": [value]},
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_a_model_the_config_dropped_stays_allowed_until_unticked(admin_client):
    api_key, _ = ApiKey.objects.issue(name="old", allowed_models=["echo", "retired-model"])
    page = admin_client.get(f"/admin/apikeys/apikey/{api_key.id}/change/").content.decode()
    assert "retired-model (not configured)" in page
    fields = {"name": "renamed", "owner_email": "", "note": "", "max_calls": "", "weight": "1"}
    admin_client.post(f"/admin/apikeys/apikey/{api_key.id}/change/", {**fields, "allowed_models": ["retired-model"]})
    api_key.refresh_from_db()
    assert (api_key.name, api_key.allowed_models) == ("renamed", ["retired-model"])


def test_a_key_page_shows_its_limits_and_device_time_per_day(admin_client):
    from llmjobs import admission, lifecycle
    from tests.helpers import CheckedChat

    api_key, _ = ApiKey.objects.issue(name="gpu user", weight=2, max_calls=9, allowed_models=["tiny-gpt2"])
    for seconds in (1.25, 0.5):
        job = admission.create_job(api_key.id, "tiny-gpt2", CheckedChat())
        lifecycle.finish(job.id, "out", 1, 1, device=lifecycle.DeviceUse(seconds, 4, timezone.now()))
    page = admin_client.get(f"/admin/apikeys/apikey/{api_key.id}/change/").content.decode()
    assert "device-seconds" in page and "1.750" in page
    assert "calls 0 / 9" in page and "tiny-gpt2; weight 2" in page
    assert 'name="weight" value="2"' in page
    assert page.count('<rect class="bar"') == 4 * 30  # four charts, a bar a day


def test_saving_a_key_never_writes_its_counters(admin_client):
    api_key, _ = ApiKey.objects.issue(name="a", max_calls=10)
    stale = ApiKey.objects.get(id=api_key.id)
    ApiKey.objects.filter(id=api_key.id).update(calls_used=7, tokens_used=70)  # calls served meanwhile
    stale.save()  # a full save of a stale row
    stale.calls_used = 0
    stale.save(update_fields=["calls_used", "note"])
    fields = {"name": "a", "owner_email": "", "note": "", "max_calls": "10", "weight": "1"}
    admin_client.post(f"/admin/apikeys/apikey/{api_key.id}/change/", fields)  # saved without changes
    api_key.refresh_from_db()
    assert (api_key.calls_used, api_key.tokens_used) == (7, 70)


def test_the_overview_lists_top_keys_and_models(admin_client):
    from llmjobs import admission, lifecycle
    from tests.helpers import CheckedChat

    busy, _ = ApiKey.objects.issue(name="busy")
    quiet, _ = ApiKey.objects.issue(name="quiet")
    for api_key, model, calls in ((busy, "echo", 3), (quiet, "words", 1)):
        for _ in range(calls):
            lifecycle.finish(admission.create_job(api_key.id, model, CheckedChat()).id, "out", 1, 1)
    listing = admin_client.get("/admin/apikeys/apikey/").content.decode()
    assert reverse("admin:apikeys_usage") in listing
    page = admin_client.get(reverse("admin:apikeys_usage")).content.decode()
    keys_table = page[page.index('id="top-keys"') : page.index('id="top-models"')]
    assert keys_table.index("busy") < keys_table.index("quiet")
    assert "echo" in page[page.index('id="top-models"') :]
    assert page.count('<rect class="bar"') == 4 * 30


def test_the_overview_needs_the_admin(client):
    response = client.get(reverse("admin:apikeys_usage"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_rate_limits_are_set_in_the_admin(admin_client):
    fields = {"name": "limited", "owner_email": "", "note": "", "max_calls": "", "weight": "1", "rpm": "30"}
    admin_client.post("/admin/apikeys/apikey/add/", {**fields, "model_limits": '{"echo": {"tpm": 500}}'})
    row = ApiKey.objects.get()
    assert (row.rpm, row.tpm, row.max_parallel, row.model_limits) == (30, None, None, {"echo": {"tpm": 500}})
    page = admin_client.get(f"/admin/apikeys/apikey/{row.id}/change/").content.decode()
    assert "rpm 30, tpm ∞, in flight ∞; per model echo" in page
    refused = admin_client.post("/admin/apikeys/apikey/add/", {**fields, "model_limits": '{"echo": {"rpm": 0}}'})
    assert "limits are rpm, tpm and max_parallel" in refused.content.decode()
    plain = admin_client.post("/admin/apikeys/apikey/add/", {**fields, "name": "plain", "rpm": ""})
    assert plain.status_code == 200 and ApiKey.objects.get(name="plain").model_limits == {}
