"""Files that hold a secret (a Ray token, an MLflow login), readable by their owner only.

Every such file is mode 0600 in a folder of mode 0700, checked after it is written. A folder that already exists
and belongs to another user, or is a symlink, is refused: whoever owns it could read or swap what we put there.

    python -m launch.secret_files ray-token FILE     a Ray token (kept if FILE exists)
    python -m launch.secret_files mlflow-login DIR   an MLflow basic-auth login (see ``mlflow_login``; kept if present)

``slurm/sweep.sbatch`` uses both for a job's folder; the README's cluster recipe uses the second.
"""
from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

MLFLOW_USER = "admin"
AUTH_CACHE_TTL_S = 3600  # how long the MLflow server trusts a login it checked (see auth_config)


class SecretFileError(PermissionError):
    """A folder or file that cannot be trusted with a secret; the message names it and the fix."""


def private_folder(folder: Path) -> Path:
    """``folder`` created (with its parents) or checked: a real folder of this user, then made mode 0700."""
    folder = Path(folder).expanduser()
    if folder.is_symlink():
        raise SecretFileError(f"{folder} is a symlink: a folder for secrets must be a real folder of your own; remove the link")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise SecretFileError(f"{folder} is not a folder; remove it or choose another place for the secrets")
    if info.st_uid != os.getuid():
        raise SecretFileError(f"{folder} belongs to user id {info.st_uid}, not to you ({os.getuid()}): whoever owns it could read the "
                              "secrets put there; choose a folder of your own")
    os.chmod(folder, 0o700)
    return folder


def check_owner_only(path: Path) -> Path:
    """Raise unless ``path`` is a regular file of this user, mode 0600, in a folder of mode 0700."""
    path = Path(path)
    info, folder = path.lstat(), path.parent.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise SecretFileError(f"{path} is not a regular file of your own; remove it")
    if stat.S_IMODE(info.st_mode) != 0o600 or stat.S_IMODE(folder.st_mode) != 0o700:
        raise SecretFileError(f"{path} is mode {stat.S_IMODE(info.st_mode):o} in a folder of mode {stat.S_IMODE(folder.st_mode):o}; "
                              "a secret must be 0600 in a 0700 folder")
    return path


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` created 0600 (never through a symlink) in a private folder; checked after writing."""
    path = Path(path).expanduser()
    private_folder(path.parent)
    if path.is_symlink():
        raise SecretFileError(f"{path} is a symlink; remove it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # (an existing file keeps its old mode through O_CREAT)
        f.write(text)
    return check_owner_only(path)


def make_owner_only(path: Path) -> Path:
    """An existing secret file (e.g. one Ray wrote with the umask's 0644) made 0600 in a 0700 folder."""
    path = Path(path).expanduser()
    private_folder(path.parent)
    if path.is_symlink() or not path.is_file():
        raise SecretFileError(f"{path} is not a regular file; remove it")
    os.chmod(path, 0o600)
    return check_owner_only(path)


def ray_token(path: Path) -> Path:
    """A Ray token at ``path``: the one there made private, else a new one (256 bits, as ``ray get-auth-token`` makes)."""
    path = Path(path).expanduser()
    return make_owner_only(path) if path.exists() else write_secret(path, secrets.token_hex(32))


def local_ray_token() -> Path | None:
    """Before a local ``ray.init``: the token Ray will use, private. Ray 2.60 turns token authentication on for a local
    cluster and writes ``~/.ray/auth_token`` with the umask's mode (0644 in a 0755 folder: any user of a shared login
    node could read it and run code in the sweep's Ray). None where the token is not a file (RAY_AUTH_TOKEN) or
    authentication is off."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return ray_token(Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"))


def mlflow_login(folder: Path) -> dict[str, Path]:
    """An MLflow basic-auth login in ``folder`` (kept where it exists, so a restarted server accepts the same login):

    - ``auth.ini``: the auth app's config (``MLFLOW_AUTH_CONFIG_PATH``): the admin login and its user database
      ``auth.db`` beside it; no permission for anyone else; checked logins cached (see ``auth_config``);
    - ``server.env``: what the server needs in its environment (the config's path, the CSRF secret key);
    - ``client.env``: what the driver and trials need (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).

    The env files are ``KEY=value`` lines for ``set -a; . FILE; set +a``: the secrets never appear on a command line.
    A kept login's ``auth.ini`` is rewritten with today's settings and its own password (a job requeued after an
    upgrade gets them too)."""
    folder = private_folder(folder).resolve()
    files = {name: folder / f"{name}.{ext}" for name, ext in (("auth", "ini"), ("server", "env"), ("client", "env"))}
    if all(p.exists() for p in files.values()):
        files = {name: check_owner_only(p) for name, p in files.items()}
        today = auth_config(folder, read_env(files["client"])["MLFLOW_TRACKING_PASSWORD"])
        if files["auth"].read_text() != today:
            write_secret(files["auth"], today)
        return files
    password = secrets.token_urlsafe(24)
    write_secret(files["auth"], auth_config(folder, password))
    write_secret(files["server"], f"MLFLOW_AUTH_CONFIG_PATH={files['auth']}\nMLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n")
    write_secret(files["client"], f"MLFLOW_TRACKING_USERNAME={MLFLOW_USER}\nMLFLOW_TRACKING_PASSWORD={password}\n")
    (folder / "auth.db").unlink(missing_ok=True)  # a user database of an older login would keep the older password
    return files


def read_env(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of an env file that ``mlflow_login`` wrote, as a dict."""
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines())


def auth_config(folder: Path, password: str, cache_ttl_s: int = AUTH_CACHE_TTL_S) -> str:
    """The auth app's ``auth.ini``: one admin, nobody else allowed anything, and checked logins cached for an hour.

    Without the cache MLflow hashes the password again (werkzeug's scrypt, about 0.2 s of CPU) on every REST request, in
    the server's one worker: a trial's ``log_model`` (one metric-history request per metric) took 99 s in the Slurm
    job, and an authenticated request took 440-497 ms against 14-18 ms with the cache (``python -m bench``, part 6).
    Only logins that passed are cached, keyed by an HMAC with a per-process key; a wrong password is checked in full
    every time. The job's one login never changes while its server runs, and a requeue starts a new server."""
    return (f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{folder / 'auth.db'}\n"
            f"admin_username = {MLFLOW_USER}\nadmin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {cache_ttl_s}\n")


def main(argv: list[str]) -> int:
    commands = {"ray-token": ray_token, "mlflow-login": mlflow_login}
    if len(argv) != 2 or argv[0] not in commands:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    try:
        commands[argv[0]](Path(argv[1]))
    except (SecretFileError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
