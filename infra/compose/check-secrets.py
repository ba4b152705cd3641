"""The compose `check-secrets` service (one-shot): every other service waits for it to exit 0, so
`docker compose up` starts nothing while a secret in .env is missing, still an example value, or weak.

Refused: anything containing `change-me`/`changeme`/`example`, and any secret shorter than 16 characters
(`PREFECT_AUTH_STRING`'s password part; the S3 access keys are names, 3+ characters). Also checked: the
characters each value may hold (POSTGRES_PASSWORD and REDIS_PASSWORD go into URLs) and that the three S3 identities
differ. The message names the variable, never its value. Standard library only.
Generate secrets with e.g. `openssl rand -hex 24` (or `python3 -c "import secrets; print(secrets.token_hex(24))"`).
"""
from __future__ import annotations

import os
import re
import sys

MIN_SECRET = 16
PLACEHOLDER = re.compile(r"change-?me|example|placeholder|secret-here", re.I)
TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")  # safe in URLs and in the SeaweedFS identities file
SECRET = re.compile(r"^[A-Za-z0-9._~+/=-]+$")

# name -> (kind, pattern)
CHECKS = {
    "POSTGRES_PASSWORD": ("secret", TOKEN),
    "PREFECT_AUTH_STRING": ("auth", None),
    "S3_ACCESS_KEY": ("key", TOKEN),
    "S3_SECRET_KEY": ("secret", SECRET),
    "S3_SOURCE_ACCESS_KEY": ("key", TOKEN),
    "S3_SOURCE_SECRET_KEY": ("secret", SECRET),
    "S3_ARCHIVE_ACCESS_KEY": ("key", TOKEN),
    "S3_ARCHIVE_SECRET_KEY": ("secret", SECRET),
    "REDIS_PASSWORD": ("secret", TOKEN),  # goes into RN50_REDIS_URL and Redis's config file
}


def problems(env: dict[str, str]) -> list[str]:
    out = []
    for name, (kind, pattern) in CHECKS.items():
        value = env.get(name, "")
        if not value:
            out.append(f"{name} is not set")
            continue
        if PLACEHOLDER.search(value):
            out.append(f"{name} still holds an example value")
            continue
        if kind == "auth":
            user, sep, password = value.partition(":")
            if not sep or not TOKEN.match(user):
                out.append(f"{name} must be user:password (user: letters, digits, - and _)")
            elif len(password) < MIN_SECRET:
                out.append(f"{name}: the password is shorter than {MIN_SECRET} characters")
            continue
        if not pattern.match(value):
            allowed = "letters, digits, - and _" if pattern is TOKEN else "letters, digits and . _ ~ + / = -"
            out.append(f"{name} may hold only {allowed}")
        elif kind == "secret" and len(value) < MIN_SECRET:
            out.append(f"{name} is shorter than {MIN_SECRET} characters")
        elif kind == "key" and len(value) < 3:
            out.append(f"{name} is shorter than 3 characters")
    keys = [env.get(n, "") for n in ("S3_ACCESS_KEY", "S3_SOURCE_ACCESS_KEY", "S3_ARCHIVE_ACCESS_KEY")]
    if all(keys) and len(set(keys)) < 3:
        out.append("S3_ACCESS_KEY, S3_SOURCE_ACCESS_KEY and S3_ARCHIVE_ACCESS_KEY must differ")
    secrets = [env.get(n, "") for n in ("S3_SECRET_KEY", "S3_SOURCE_SECRET_KEY", "S3_ARCHIVE_SECRET_KEY")]
    if all(secrets) and len(set(secrets)) < 3:
        out.append("S3_SECRET_KEY, S3_SOURCE_SECRET_KEY and S3_ARCHIVE_SECRET_KEY must differ")
    return out


def main() -> int:
    found = problems(dict(os.environ))
    if found:
        print("refusing to start: " + "; ".join(found) + " (set real secrets in .env: see infra/compose/env.example)",
              file=sys.stderr)
        return 1
    print("secrets: set, no example values, long enough")
    return 0


if __name__ == "__main__":
    sys.exit(main())
