"""Reading configuration from the environment and from systemd credentials.

Every daemon builds one frozen dataclass from these helpers at start-up. A bad value raises
ConfigError naming the variable; the daemon prints it and exits non-zero (exit code 2), the
only situation in which a daemon exits on its own: running with a configuration nobody
intended is worse than not starting, and systemd shows the failure.
"""

import math
import os
from dataclasses import field, fields
from pathlib import Path

CONFIG_EXIT_CODE = 2


class ConfigError(ValueError):
    """A configuration value is missing or malformed. The message names the variable."""


def env_str(name, default=None, env=None):
    env = os.environ if env is None else env
    value = env.get(name)
    if value is None or value.strip() == "":
        if default is None:
            raise ConfigError(f"{name} is required but not set")
        return default
    return value.strip()


def env_float(name, default, minimum=None, maximum=None, env=None):
    return _env_number(name, default, float, "a number", minimum, maximum, env)


def env_int(name, default, minimum=None, maximum=None, env=None):
    return _env_number(name, default, int, "a whole number", minimum, maximum, env)


def _env_number(name, default, parse, kind, minimum, maximum, env):
    raw = env_str(name, str(default), env)
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} is above the maximum {maximum}")
    return value


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_bool(name, default, env=None):
    raw = env_str(name, "true" if default else "false", env).lower()
    if raw not in _BOOLEANS:
        raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")
    return _BOOLEANS[raw]


def env_list(name, default, env=None):
    """Comma-separated list; empty items are dropped. default is a tuple."""
    raw = env_str(name, ",".join(default), env)
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not items:
        raise ConfigError(f"{name}={raw!r} names nothing")
    return items


def setting(name, default, minimum=None, maximum=None, default_from=None, choices=None, check=None):
    """A dataclass field read by settings() from environment variable `name`, by the type of
    its default: env_str (str), env_bool (bool), env_list (tuple), env_int (int), env_float
    (float; the bounds apply to numbers only). default_from names an earlier field of the same
    class whose value is the default (one setting following another). choices: the values a
    str (or every item of a tuple) may take; check(value) -> value raises ConfigError for a
    rule the bounds cannot say."""
    return field(default=default, metadata={"env": (name, minimum, maximum, default_from, choices, check)})


def nested(cls):
    """A dataclass field holding another settings class, read by settings() as well."""
    return field(default_factory=cls, metadata={"nested": cls})


def settings(cls, env=None):
    """An instance of dataclass cls with every setting() and nested() field read from the
    environment (one table: each setting is declared once, beside its name and bounds). Other
    fields keep their defaults (a from_env of the class fills in what is not one setting)."""
    values = {}
    for item in fields(cls):
        if "nested" in item.metadata:
            values[item.name] = settings(item.metadata["nested"], env)
            continue
        if "env" not in item.metadata:
            continue                # not a setting: the class's own from_env fills it in
        name, minimum, maximum, default_from, choices, check = item.metadata["env"]
        default = values[default_from] if default_from else item.default
        read = {str: env_str, bool: env_bool, tuple: env_list, int: env_int}.get(type(item.default), env_float)
        bounds = (minimum, maximum) if read in (env_int, env_float) else ()
        value = read(name, default, *bounds, env=env)
        value = chosen(name, value, choices) if choices else value
        values[item.name] = check(value) if check else value
    return cls(**values)


def chosen(name, value, choices):
    """value (a str, or a tuple of them) if it is (every item is) one of choices: a typo
    ("watchdgo") must not start a daemon that then ignores what the operator meant."""
    unknown = [item for item in ((value,) if isinstance(value, str) else value) if item not in choices]
    if unknown:
        shown, named = (value, "") if isinstance(value, str) else (",".join(value), f": {','.join(unknown)}")
        raise ConfigError(f"{name}={shown!r}{named} is not one of {','.join(choices)}")
    return value


def credential(file_name, env_names=(), env=None):
    """A secret from $CREDENTIALS_DIRECTORY/<file_name>, else from the first set variable of
    env_names, else None. systemd's LoadCredential= is the recommended path: the secret never
    appears in the unit, the environment of other processes, or `systemctl show`.
    A file that is there but cannot be read (permissions, a directory systemd did not make
    accessible to this process, not UTF-8) or is empty, and a CREDENTIALS_DIRECTORY that does
    not exist, are a ConfigError naming the file and the unit setting that should provide it:
    someone meant to configure the secret, and guessing past it could start a daemon without
    its key (fail-closed: exit 2, never a traceback). Only a file absent from an existing
    directory falls through to env_names (the setting is optional where the caller allows it)."""
    env = os.environ if env is None else env
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        value = _credential_file(Path(directory), file_name)
        if value is not None:
            return value
    for name in env_names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _credential_file(directory, file_name):
    """The stripped text of directory/file_name; None if the directory exists without it."""
    path = directory / file_name
    try:
        value = path.read_text(encoding="utf-8").strip()
        problem = None if value else f"{path} is empty"
    except FileNotFoundError:
        if os.path.isdir(directory):
            return None
        problem = f"CREDENTIALS_DIRECTORY={directory} does not exist"
    except UnicodeDecodeError:
        problem = f"{path} is not UTF-8 text"    # not the decoder's message: it quotes the secret
    except OSError as exc:
        problem = f"cannot read {path} ({type(exc).__name__}: {exc.strerror})"
    if problem:
        raise ConfigError(f"credential {file_name}: {problem}; {credential_provider(directory, file_name)}")
    return value


def credential_provider(directory, file_name):
    """Which setting should provide a credential, for an error message: systemd hands a unit
    its credentials in /run/credentials/<unit>, so there it is that unit's LoadCredential=."""
    unit = Path(directory).name if Path(directory).parent == Path("/run/credentials") else "a unit"
    return (f"{unit}'s LoadCredential={file_name}:<file> provides it, or for a shell the file in "
            f"CREDENTIALS_DIRECTORY (docs/DEPLOY.md, Credentials)")
