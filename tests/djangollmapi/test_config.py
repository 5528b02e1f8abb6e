"""The config loader: defaults, env overrides, and errors that name file, key, reason."""

from pathlib import Path

import pytest

from djangollmapi.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "DJANGO_LLM_API_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DJANGO_LLM_API_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def write(tmp_path, text):
    path = tmp_path / "djangollmapi.toml"
    path.write_text(text)
    return path


def test_no_file_gives_the_embedded_default(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    config = load_config()
    assert config.source == "<embedded default>"
    assert [d.name for d in config.deployments] == ["smollm2", "echo", "minilm"]
    assert config.server.default_model == "smollm2"
    assert config.devices == ["cpu"]
    assert config.embedded_redis and config.database_url == ""
    assert config.deployments[0].options["model_path"] == str(tmp_path / "data" / "models" / "smollm2-135m-instruct")
    assert config.broker_url == f"redis+socket://{tmp_path / 'data' / 'redis.sock'}"


def test_explicit_missing_file_is_an_error(clean_env, tmp_path):
    clean_env.setenv("DJANGO_LLM_API_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"absent\.toml: -: file not found"):
        load_config()


def test_env_overrides_secrets_and_urls(clean_env, tmp_path):
    path = write(tmp_path, '[database]\nurl = "sqlite:///x"\n[redis]\nurl = "redis://a:1/0"\n')
    clean_env.setenv("DATABASE_URL", "postgres://u@h/db")
    clean_env.setenv("REDIS_URL", "redis://b:2/1")
    clean_env.setenv("DJANGO_SECRET_KEY", "s3")
    config = load_config(path)
    assert (config.database_url, config.redis_url, config.server.secret_key) == (
        "postgres://u@h/db",
        "redis://b:2/1",
        "s3",
    )
    assert config.broker_url == "redis://b:2/1"


def test_the_pool_size_reaches_postgresql_settings(clean_env, tmp_path):
    from djangollmapi.settings import database_settings

    config = load_config(write(tmp_path, "[database]\npool_max_size = 7\n"))
    db = database_settings("postgres://u@h/db", tmp_path, config.database.pool_max_size)
    assert db["OPTIONS"]["pool"]["max_size"] == 7
    assert load_config(write(tmp_path, "")).database.pool_max_size == 20


def test_deployments_devices_and_timeouts(clean_env, tmp_path):
    path = write(
        tmp_path,
        """
[server]
default_model = "b"
job_timeout_s = 30
[[deployments]]
name = "a"
algorithm = "algorithms.echo:Echo"
device = "cuda:0"
[[deployments]]
name = "b"
algorithm = "algorithms.echo:Echo"
device = "cuda:1"
timeout_s = 5
options = { model_path = "/abs/model", delay_ms = 3 }
[[deployments]]
name = "c"
algorithm = "algorithms.echo:Echo"
device = "cuda:0"
""",
    )
    config = load_config(path)
    assert config.devices == ["cuda:0", "cuda:1"]
    b = config.deployment("b")
    assert b.options == {"model_path": "/abs/model", "delay_ms": 3}
    assert config.job_timeout_for(b) == 5
    assert config.job_timeout_for(config.deployment("a")) == 30


UPSTREAM = "[[upstreams]]\nname = 'g'\nbase_url = 'https://u.example/v1'\n"
ROUTE = "[[routes]]\nname = 'r'\n"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[server\n", "-", "not valid TOML"),
        ("[server]\nport = 'x'\n", "server.port", "must be an integer, got str"),
        ("[server]\nport = -1\n", "server.port", "must be positive"),
        ("[server]\ndebug = 1\n", "server.debug", "must be true or false"),
        ("[server]\nprot = 1\n", "server.prot", "unknown key"),
        ("[bogus]\n", "bogus", "unknown key"),
        ("deployments = []\n", "deployments", "non-empty array"),
        ("[[deployments]]\nname = 'x'\n", "deployments[0].algorithm", "is required"),
        ("[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\ndevice = 'gpu0'\n", "deployments[0].device", "not cpu"),
        ("[[deployments]]\nname = 'x y'\nalgorithm = 'a:B'\n", "deployments[0].name", "not a valid model name"),
        (
            "[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\n[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\n",
            "deployments[1].name",
            "used twice",
        ),
        ("[server]\ndefault_model = 'nope'\n", "server.default_model", "no deployment named"),
        ("[worker]\ntime_limit_s = 0\n", "worker.time_limit_s", "must be positive"),
        ("[worker]\nload_timeout_s = -1\n", "worker.load_timeout_s", "must be positive"),
        ("[worker]\nmax_held = 0\n", "worker.max_held", "must be at least 1"),
        (
            "[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\nmax_batch = 0\n",
            "deployments[0].max_batch",
            "must be at least 1",
        ),
        ("[metrics]\nallow = ['nope']\n", "metrics.allow", "not an IP address or network"),
        ("[metrics]\nenabled = 'no'\n", "metrics.enabled", "must be true or false"),
        ("[limits]\ntimezone = 'Mars/Olympus'\n", "limits.timezone", "not a time zone"),
        ("[limits]\ntimezone = '../../etc/passwd'\n", "limits.timezone", "not a time zone"),
        ("[server]\nusage_rollups = 2\n", "server.usage_rollups", "must be true or false"),
        ("[server]\nhttps = 'yes'\n", "server.https", "must be true or false"),
        ("[server]\njob_timeout_s = true\n", "server.job_timeout_s", "not a boolean"),
        ("[server]\njob_timeout_s = inf\n", "server.job_timeout_s", "finite"),
        ("[server]\njob_timeout_s = nan\n", "server.job_timeout_s", "finite"),
        ("[worker]\ntime_limit_s = inf\n", "worker.time_limit_s", "finite"),
        ("[worker]\nheartbeat_s = 0.001\n", "worker.heartbeat_s", "at least"),
        ("[server]\nport = 70000\n", "server.port", "at most 65535"),
        ("[server]\nmax_queue_depth = 0\n", "server.max_queue_depth", "must be positive"),
        ("[server]\nreap_after_s = 0.5\n", "server.reap_after_s", "must be at least 1"),
        (
            "[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\ntimeout_s = inf\n",
            "deployments[0].timeout_s",
            "finite",
        ),
        ("upstreams = 3\n", "upstreams", "array of tables"),
        (UPSTREAM, "upstreams[0].models", "must be an array"),
        (UPSTREAM + "models = []\n", "upstreams[0].models", "at least one"),
        (UPSTREAM.replace("https://u.example/v1", "file:///x") + "models = ['m']\n", "upstreams[0].base_url", "http"),
        (UPSTREAM + "models = ['m']\napi_key_env = 'NOT A VAR'\n", "upstreams[0].api_key_env", "environment"),
        (UPSTREAM + "models = ['m']\ntimeout_s = 0\n", "upstreams[0].timeout_s", "must be positive"),
        (UPSTREAM + "models = ['m']\nheaders = { Host = 'x' }\n", "upstreams[0].headers.Host", "may set"),
        (UPSTREAM + "models = ['m']\nprices = { other = { input = 1 } }\n", "upstreams[0].prices.other", "not one of"),
        (UPSTREAM + "models = ['m']\nprices = { m = { input = -1 } }\n", "upstreams[0].prices.m.input", "0 or more"),
        (UPSTREAM + "models = ['smollm2']\n", "upstreams[0].models", "already a model name"),
        (UPSTREAM + "models = ['m']\n" + UPSTREAM + "models = ['n']\n", "upstreams[1].name", "used twice"),
        ("[cors]\nallowed_origins = ['*']\n", "cors.allowed_origins", "not an origin"),
        ("[jwt]\nissuer = 'i'\naudience = 'a'\n", "jwt", "exactly one of jwks_file and jwks_url"),
        ("[jwt]\nissuer = 'i'\naudience = 'a'\njwks_url = 'http://idp/jwks'\n", "jwt.jwks_url", "https"),
        (
            "[jwt]\nissuer = 'i'\naudience = 'a'\njwks_url = 'http://127.0.0.1.evil.example/jwks'\n",
            "jwt.jwks_url",
            "https",
        ),
        ("[jwt]\nissuer = 'i'\naudience = 'a'\njwks_file = 'missing.json'\n", "jwt.jwks_file", "no such file"),
        (
            "[jwt]\nissuer = 'i'\naudience = 'a'\njwks_url = 'https://idp/jwks'\nleeway_s = -1\n",
            "jwt.leeway_s",
            "0 or more",
        ),
        ("[jwt]\naudience = 'a'\njwks_url = 'https://idp/jwks'\n", "jwt.issuer", "is required"),
        (
            "[jwt]\nissuer = 'i'\naudience = 'a'\njwks_url = 'https://idp/jwks'\nalgorithms = ['HS256']\n",
            "jwt.algorithms",
            "asymmetric",
        ),
        ("server = 3\n", "server", "must be a table, got int"),
        ("deployments = [1]\n", "deployments[0]", "must be a table"),
        (
            "[[deployments]]\nname = 'x'\nalgorithm = 'a:B'\noptions = { model_path = '' }\n",
            "deployments[0].options.model_path",
            "non-empty string",
        ),
        ("[server]\nallowed_hosts = [1]\n", "server.allowed_hosts[0]", "must be a string, got int"),
        ("[cors]\nmax_age_s = -1\n", "cors.max_age_s", "0 or more"),
        ("[database]\npool_max_size = 0\n", "database.pool_max_size", "at least 1"),
        (UPSTREAM + "models = ['m']\nheaders = { X-A = 1 }\n", "upstreams[0].headers.X-A", "one-line string"),
        (UPSTREAM + "models = ['m']\nprices = { m = { in = 1 } }\n", "upstreams[0].prices.m.in", "unknown key"),
        (UPSTREAM + "models = ['m']\nheaders = ['a']\n", "upstreams[0].headers", "must be a table, got array"),
        ("[jwt]\na = 1\n", "jwt.a", "unknown key"),  # the typo first, not the keys it hid
        (UPSTREAM + "models = ['m']\nallowed_fails = 0\n", "upstreams[0].allowed_fails", "must be positive"),
        (UPSTREAM + "models = ['m']\ncooldown_s = 0\n", "upstreams[0].cooldown_s", "must be positive"),
        ("routes = 1\n", "routes", "array of tables"),
        (ROUTE + "targets = []\n", "routes[0].targets", "non-empty array"),
        (ROUTE + "targets = ['nope']\n", "routes[0].targets[0].model", "no deployment or upstream model"),
        (ROUTE + "targets = ['echo', 'echo']\n", "routes[0].targets[1].model", "named twice"),
        (ROUTE + "targets = [3]\n", "routes[0].targets[0]", "a model name or a table"),
        (ROUTE + "targets = [{ model = 'echo', weight = 0 }]\n", "routes[0].targets[0].weight", "must be positive"),
        (ROUTE + "targets = [{ model = 'echo', order = 0 }]\n", "routes[0].targets[0].order", "must be positive"),
        (ROUTE + "targets = [{ model = 'echo', wieght = 2 }]\n", "routes[0].targets[0].wieght", "unknown key"),
        (ROUTE.replace("'r'", "'smollm2'") + "targets = ['echo']\n", "routes[0].name", "already a model name"),
        (ROUTE + "targets = ['echo']\n" + ROUTE + "targets = ['minilm']\n", "routes[1].name", "used twice"),
    ],
)
def test_broken_file_names_file_key_and_reason(clean_env, tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_unknown_user_in_data_dir_is_a_config_error(clean_env, tmp_path):
    clean_env.delenv("DJANGO_LLM_API_DATA_DIR")
    path = write(tmp_path, "[server]\ndata_dir = '~nosuchuser4242/x'\n")
    with pytest.raises(ConfigError, match=r"server\.data_dir: cannot expand"):
        load_config(path)


def test_a_data_dir_that_is_not_text_is_a_config_error(clean_env, tmp_path):
    clean_env.delenv("DJANGO_LLM_API_DATA_DIR")  # the environment would win over the file
    path = write(tmp_path, "[server]\ndata_dir = 5\n")
    with pytest.raises(ConfigError, match=r"server\.data_dir: must be a string, got int"):
        load_config(path)


def test_non_utf8_file_is_a_config_error(clean_env, tmp_path):
    path = tmp_path / "djangollmapi.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_the_shipped_example_config_parses(clean_env):
    config = load_config(ROOT / "config" / "djangollmapi.toml")
    devices = config.devices
    assert sum(device.startswith("cuda:") for device in devices) == 2
    assert "cpu" in devices


def test_upstreams_aliases_prices_and_model_names(clean_env, tmp_path, monkeypatch):
    path = write(
        tmp_path,
        UPSTREAM + "api_key_env = 'G_KEY'\nmodels = { fast = 'llama-3.1-8b-instant' }\n"
        "prices = { fast = { input = 0.5, output = 1.5 } }\n"
        "[[upstreams]]\nname = 'ollama'\nbase_url = 'http://127.0.0.1:11434/v1/'\nmodels = ['llama3.2']\n",
    )
    config = load_config(path)
    groq, ollama = config.upstreams
    assert config.model_names == ["smollm2", "echo", "minilm", "fast", "llama3.2"]
    upstream, model = config.upstream_for("fast")
    assert (upstream.name, model.upstream_name) == ("g", "llama-3.1-8b-instant")
    assert model.cost(1_000_000, 2_000_000) == pytest.approx(3.5)
    assert ollama.base_url == "http://127.0.0.1:11434/v1"  # trailing slash dropped
    assert ollama.model("llama3.2").cost(10, 10) is None
    assert config.upstream_for("smollm2") is None
    monkeypatch.setenv("G_KEY", "secret-from-env")
    assert groq.secret() == "secret-from-env"


def test_broken_config_stops_manage_py_with_the_reason(clean_env, tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, "[server]\nport = 'eighty'\n")
    clean_env.setenv("DJANGO_LLM_API_CONFIG", str(path))
    clean_env.setenv("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert f"djangollmapi: configuration error: {path}: server.port: must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_what_is_derived_from_the_config_is_computed_on_it(clean_env, tmp_path):
    path = write(tmp_path, "[server]\nhost = '::1'\nport = 9000\nweb_threads = 700\n[worker]\ntime_limit_s = 100\n")
    config = load_config(path)
    assert (config.server.bind, config.server.base_url) == ("[::1]:9000", "http://[::1]:9000")
    assert config.server.worker_connections == 1400  # above the threads: each may hold a stream
    assert config.server.model_copy(update={"web_threads": 32}).worker_connections == 1000
    assert (config.worker.soft_time_limit_s, config.worker.visibility_timeout_s) == (95, 400)
    smollm2 = config.deployment("smollm2")
    assert config.job_time_limits(smollm2) == (100, 100)  # the job timeout (120 s) capped by the hard limit
    quick = smollm2.model_copy(update={"timeout_s": 5.0})
    assert config.job_time_limits(quick) == (5.0, 7.0)  # the hard limit 2 s after the soft one
