"""The quota is exact under concurrency: one conditional UPDATE per call."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import key_row

pytestmark = pytest.mark.django_db(transaction=True)


def test_60_concurrent_calls_on_a_quota_of_25(live, make_key):
    key = make_key(max_calls=25)

    def call(_):
        response = requests.post(
            f"{live.url}/api/",
            headers={"Authorization": f"Bearer {key}"},
            json={"text": "hi", "model": "echo"},
            timeout=60,
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=60) as pool:
        statuses = list(pool.map(call, range(60)))

    assert statuses.count(200) == 25, statuses
    assert statuses.count(429) == 35, statuses
    assert key_row(key).calls_used == 25
