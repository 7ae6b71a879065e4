"""The test-service helpers: real servers are found, unreachable ones skip with a
reason (or fail, in CI)."""

import pytest


@pytest.fixture
def services():
    # Imported here, after pytest has loaded it as a plugin (and rewritten its asserts).
    import services

    return services


@pytest.mark.services
def test_reachable_services_give_their_urls(services):
    assert services.require_postgres() == services.postgres_url()
    assert services.require_redis() == services.redis_url()


def test_unreachable_services_skip_with_a_reason(services, unused_port, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("CHEXMASK_TEST_PG_URL", f"postgresql://postgres@127.0.0.1:{unused_port}/x")
    with pytest.raises(pytest.skip.Exception, match=r"PostgreSQL not reachable.*CHEXMASK_TEST_PG_URL"):
        services.require_postgres()
    with pytest.raises(pytest.skip.Exception, match="Redis not reachable"):
        services.require_redis(f"redis://127.0.0.1:{unused_port}/0")


def test_unreachable_services_fail_in_ci(services, unused_port, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)PostgreSQL not reachable.*\.ci/run should have started it"):
        services.require_postgres(f"postgresql://postgres@127.0.0.1:{unused_port}/x")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)Redis not reachable.*\.ci/run should have started it"):
        services.require_redis(f"redis://127.0.0.1:{unused_port}/0")


def test_passwords_stay_out_of_skip_messages(services, unused_port, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        services.require_postgres(f"postgresql://u:hunter2@127.0.0.1:{unused_port}/x")
    assert "hunter2" not in str(skipped.value) and "u:***@" in str(skipped.value)


@pytest.mark.services
def test_moto_server_speaks_s3_over_http(services, moto_endpoint):
    client = services.s3_client(moto_endpoint)
    client.create_bucket(Bucket="services-check")
    client.put_object(Bucket="services-check", Key="k", Body=b"v")
    assert client.get_object(Bucket="services-check", Key="k")["Body"].read() == b"v"
