"""Key format, hashing and parsing."""

from apikeys import keys


def test_new_key_has_the_documented_format():
    credentials = keys.new_credentials()
    scheme, prefix, secret = credentials.plaintext.split("_", 2)
    assert scheme == "dla"
    assert prefix == credentials.prefix and len(prefix) == 12 and prefix.isalnum() and prefix.islower()
    assert len(secret) >= 32
    assert credentials.secret_hash == keys.hash_secret(secret)
    assert secret not in credentials.secret_hash


def test_parse_round_trips_and_rejects_garbage():
    credentials = keys.new_credentials()
    assert keys.parse_key(credentials.plaintext) == (credentials.prefix, credentials.secret_hash)
    for bad in (
        "",
        "dla_",
        "dla_short_" + "x" * 40,
        "sk-" + "x" * 40,
        "dla_ABCDEFGHIJKL_" + "x" * 40,
        "dla_abcdefghijkl_tooshort",
    ):
        assert keys.parse_key(bad) is None
