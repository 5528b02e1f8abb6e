"""The admin shows a new key once, right after "add", and never again."""

import pytest

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
            "allowed_models": "[]",
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
        {"name": "renamed", "owner_email": "", "note": "", "max_calls": "10", "allowed_models": "[]", "weight": "1"},
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


@pytest.mark.parametrize("value", ['"echo"', "5", '["echo", 3]', '[""]', "{}"])
def test_allowed_models_must_be_a_list_of_names(admin_client, value):
    response = admin_client.post(
        "/admin/apikeys/apikey/add/",
        {"name": "x", "owner_email": "", "note": "", "max_calls": "", "allowed_models": value},
    )
    assert response.status_code == 200
    assert "Give a list of model names" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_a_key_page_shows_its_device_time_per_day(admin_client):
    from llmjobs.models import Job

    api_key, _ = ApiKey.objects.issue(name="gpu user", weight=2)
    Job.objects.create(api_key=api_key, model="tiny-gpt2", status=Job.Status.SUCCEEDED, device_s=1.25, batch_size=4)
    Job.objects.create(api_key=api_key, model="tiny-gpt2", status=Job.Status.SUCCEEDED, device_s=0.5, batch_size=1)
    page = admin_client.get(f"/admin/apikeys/apikey/{api_key.id}/change/").content.decode()
    assert "device-seconds" in page and "1.750" in page
    assert 'name="weight" value="2"' in page
