"""Secrets stresslab writes (Ray tokens, MLflow logins): 0600 files in 0700 folders; untrusted folders refused."""
import os
import stat
from pathlib import Path

import pytest

from launch import secret_files
from launch.secret_files import SecretFileError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_secret_is_0600_in_a_0700_folder_even_where_the_umask_and_an_older_file_say_otherwise(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    old = folder / "token"
    old.write_text("old")
    os.chmod(old, 0o644)
    secret_files.write_secret(old, "new")
    assert (old.read_text(), mode(old), mode(folder)) == ("new", 0o600, 0o700)
    created = secret_files.write_secret(tmp_path / "fresh" / "deeper" / "token", "x")
    assert (mode(created), mode(created.parent)) == (0o600, 0o700)


def test_symlinks_are_refused_for_the_folder_and_for_the_file(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SecretFileError, match="link is a symlink"):
        secret_files.write_secret(tmp_path / "link" / "token", "x")
    target = tmp_path / "elsewhere"
    target.write_text("not to be overwritten")
    (real / "token").symlink_to(target)
    with pytest.raises(SecretFileError, match="token is a symlink"):
        secret_files.write_secret(real / "token", "x")
    assert target.read_text() == "not to be overwritten"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_a_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 4242, -1)
    with pytest.raises(SecretFileError, match=f"belongs to user id 4242, not to you \\({os.getuid()}\\)"):
        secret_files.write_secret(folder / "token", "x")
    assert not (folder / "token").exists()


def test_a_token_ray_left_readable_is_made_private_and_kept_and_a_missing_one_is_created(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    os.chmod(home / ".ray", 0o755)
    token = home / ".ray" / "auth_token"
    token.write_text("a" * 64)
    os.chmod(token, 0o644)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert secret_files.local_ray_token() == token
    assert (token.read_text(), mode(token), mode(token.parent)) == ("a" * 64, 0o600, 0o700)
    elsewhere = tmp_path / "tokens" / "mine"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    assert secret_files.local_ray_token() == elsewhere
    value = elsewhere.read_text()
    assert len(value) == 64 and int(value, 16) >= 0 and mode(elsewhere) == 0o600  # 256 bits in hex, as Ray's own
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secret_files.local_ray_token() is None


def test_an_mlflow_login_is_private_consistent_and_kept_across_calls(tmp_path):
    files = secret_files.mlflow_login(tmp_path / "login")
    assert all(mode(p) == 0o600 for p in files.values()) and mode(tmp_path / "login") == 0o700
    client = dict(line.split("=", 1) for line in files["client"].read_text().splitlines())
    server = dict(line.split("=", 1) for line in files["server"].read_text().splitlines())
    ini = dict(line.split(" = ", 1) for line in files["auth"].read_text().splitlines()[1:])
    assert client["MLFLOW_TRACKING_USERNAME"] == ini["admin_username"] == "admin"
    assert client["MLFLOW_TRACKING_PASSWORD"] == ini["admin_password"] and len(ini["admin_password"]) >= 32
    assert server["MLFLOW_AUTH_CONFIG_PATH"] == str(files["auth"]) and len(server["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    assert ini["default_permission"] == "NO_PERMISSIONS"
    again = secret_files.mlflow_login(tmp_path / "login")  # a requeued job's second start: the same login
    assert again["client"].read_text() == files["client"].read_text()
    other = secret_files.mlflow_login(tmp_path / "other")
    assert other["client"].read_text() != files["client"].read_text()


def test_mlflow_reads_the_login_as_written_with_checked_logins_cached_and_a_kept_login_gets_todays_settings(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config  # MLflow's own reader of auth.ini

    files = secret_files.mlflow_login(tmp_path / "login")
    password = files["client"].read_text().split("MLFLOW_TRACKING_PASSWORD=")[1].strip()
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(files["auth"]))
    config = read_auth_config()
    assert (config.admin_username, config.admin_password, config.default_permission) == ("admin", password, "NO_PERMISSIONS")
    assert config.database_uri == f"sqlite:///{tmp_path / 'login' / 'auth.db'}"
    assert (config.auth_cache_ttl_seconds, config.auth_cache_max_size) == (3600, 10000)  # an hour; MLflow's default size
    # a login written before the cache setting existed (a job requeued after an upgrade): same password, today's settings
    files["auth"].write_text(files["auth"].read_text().replace("auth_cache_ttl_seconds = 3600\n", ""))
    kept = secret_files.mlflow_login(tmp_path / "login")
    assert read_auth_config().auth_cache_ttl_seconds == 3600 and read_auth_config().admin_password == password
    assert kept["client"].read_text() == files["client"].read_text() and mode(kept["auth"]) == 0o600


def test_the_command_line_exits_2_naming_a_refused_folder(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path)
    assert secret_files.main(["ray-token", str(tmp_path / "link" / "token")]) == 2
    assert "link is a symlink" in capsys.readouterr().err
    assert secret_files.main(["nonsense"]) == 2
