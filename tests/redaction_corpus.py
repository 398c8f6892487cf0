# ruff: noqa: E501 - corpus lines read as the events they imitate
"""Corpora for the redaction tests: coding-agent events with credentials embedded, and ordinary
events that must come through unchanged. Every credential is generated from a seeded random
source in its real shape, so no real (or even stable-looking) secret lives in this repository.

CREDENTIAL_EVENTS: (event text, the secret values none of which may survive)
ORDINARY_EVENTS:   event texts with no credential in them
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid

_random = random.Random(20261124)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
URLSAFE = ALNUM + "-_"
B64 = ALNUM + "+/"
HEX = "0123456789abcdef"


def _draw(alphabet: str, length: int) -> str:
    return "".join(_random.choice(alphabet) for _ in range(length))


def _jwt() -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"sub": _draw(HEX, 12), "iat": _random.randint(1_700_000_000, 1_800_000_000), "scope": "repo:write"}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{_draw(URLSAFE, 43)}"


def _private_key(kind: str = "RSA ") -> str:
    body = "\n".join(_draw(B64, 64) for _ in range(12))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"


def _credential_events() -> list[tuple[str, list[str]]]:
    events: list[tuple[str, list[str]]] = []

    def add(template: str, **secrets: str) -> None:
        events.append((template.format(**secrets), list(secrets.values())))

    aws_id, aws_secret = "AKIA" + _draw(UPPER_DIGITS, 16), _draw(B64, 40)
    add("session.error: botocore.exceptions.ClientError: An error occurred (SignatureDoesNotMatch) when calling "
        "PutObject with credentials {k} / secret {s}", k=aws_id, s=aws_secret)
    aws_id2, aws_secret2 = "AKIA" + _draw(UPPER_DIGITS, 16), _draw(B64, 40)
    add("file.edited: .env\n+AWS_ACCESS_KEY_ID={k}\n+AWS_SECRET_ACCESS_KEY={s}\n+AWS_REGION=eu-west-1",
        k=aws_id2, s=aws_secret2)
    add("shell: $ cat ~/.aws/credentials\n[default]\naws_access_key_id = {k}\naws_secret_access_key = {s}",
        k="ASIA" + _draw(UPPER_DIGITS, 16), s=_draw(B64, 40))
    add('Fixed the GCP upload: the maps client was built with key "{k}" hard-coded in src/geo/maps.ts',
        k="AIza" + _draw(URLSAFE, 35))
    add("curl -H 'Authorization: Bearer {t}' https://storage.googleapis.com/upload/storage/v1/b/assets/o "
        "returned 403 Forbidden", t="ya29." + _draw(URLSAFE, 120))
    add('file.edited: config/gcp-service-account.json\n{{"type": "service_account", "project_id": "acme-prod", '
        '"private_key_id": "' + _draw(HEX, 40) + '", "private_key": "{k}", '
        '"client_email": "ci@acme-prod.iam.gserviceaccount.com"}}', k=_private_key("").replace("\n", "\\n"))
    azure = _draw(B64, 86) + "=="
    add("Azure blob upload failed: DefaultEndpointsProtocol=https;AccountName=acmeassets;AccountKey={k};"
        "EndpointSuffix=core.windows.net (AuthenticationFailed)", k=azure)
    add("az login --service-principal -u 4f1c9a2e-7b1d-4c2a-9e3f-0a1b2c3d4e5f -p {s} --tenant acme.onmicrosoft.com",
        s=_draw(ALNUM, 3) + "8Q~" + _draw(ALNUM + "_~.-", 34))
    add("Fetching https://acmeassets.blob.core.windows.net/builds/app.zip?sv=2022-11-02&ss=b&srt=o&sp=r"
        "&se=2026-12-01T00:00:00Z&sig={s} failed with 404", s=_draw(ALNUM, 43) + "%3D")
    add("git push failed: remote: Invalid username or token. Password authentication is not supported.\n"
        "url = https://x-access-token:{t}@github.com/acme/api.git", t="ghp_" + _draw(ALNUM, 36))
    add("file.edited: .github/workflows/release.yml\n+        env:\n+          GH_TOKEN: {t}",
        t="ghp_" + _draw(ALNUM, 36))
    add("export GITHUB_TOKEN={t} && gh pr create --fill", t="github_pat_" + _draw(ALNUM + "_", 82))
    add("GitHub App install token {t} expired while cloning acme/web", t="ghs_" + _draw(ALNUM, 36))
    add("file.edited: .gitlab-ci.yml\n+variables:\n+  GITLAB_TOKEN: {t}", t="glpat-" + _draw(URLSAFE, 20))
    add("git clone https://oauth2:{t}@gitlab.com/acme/infra.git -> fatal: Authentication failed",
        t="glpat-" + _draw(URLSAFE, 20))
    add("Slack notify step: posting with {t} to #deploys returned not_in_channel", t="xoxb-" + "-".join(
        [_draw(string.digits, 12), _draw(string.digits, 13), _draw(ALNUM, 24)]))
    add("Added deploy notifications: SLACK_WEBHOOK_URL=https://hooks.slack.com/services/{a}/{b}/{c}",
        a="T" + _draw(UPPER_DIGITS, 10), b="B" + _draw(UPPER_DIGITS, 10), c=_draw(ALNUM, 24))
    add("stripe.error.AuthenticationError: Invalid API Key provided: {k}", k="sk_live_" + _draw(ALNUM, 24))
    add("tests/test_billing.py: stripe.api_key = '{k}'; webhook secret '{w}'",
        k="sk_test_" + _draw(ALNUM, 24), w="whsec_" + _draw(ALNUM, 32))
    add("openai.AuthenticationError: Error code: 401 - Incorrect API key provided: {k}",
        k="sk-proj-" + _draw(URLSAFE, 48))
    add("file.edited: .env.local\n+OPENAI_API_KEY={k}\n+MODEL=gpt-4.1-mini", k="sk-" + _draw(ALNUM, 48))
    add("anthropic.AuthenticationError: invalid x-api-key {k}", k="sk-ant-api03-" + _draw(URLSAFE, 93) + "AA")
    add('settings.py: ANTHROPIC_API_KEY = "{k}"  # TODO move to vault', k="sk-ant-api03-" + _draw(URLSAFE, 95))
    add("HTTP 401 from /api/me; request headers: Authorization: Bearer {t}", t=_jwt())
    add('session.error: jwt.exceptions.ExpiredSignatureError while decoding "{t}"', t=_jwt())
    add("localStorage.setItem('id_token', '{t}') in src/auth/session.ts", t=_jwt())
    add("file.edited: deploy/id_rsa\n{k}", k=_private_key("RSA "))
    add("cat ~/.ssh/id_ed25519\n{k}\nchmod 600 ~/.ssh/id_ed25519", k=_private_key("OPENSSH "))
    add("Error in migration: could not connect to postgres://app:{p}@db.internal:5432/prod (timeout)",
        p=_draw(ALNUM, 14))
    add("sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server failed\n"
        "DATABASE_URL=postgresql://admin:{p}@10.0.3.7/billing", p=_draw(ALNUM + "!*", 16))
    add("redis.exceptions.AuthenticationError for redis://default:{p}@cache:6379/0", p=_draw(ALNUM, 20))
    add("mongodb+srv://svc:{p}@cluster0.abcd.mongodb.net/app?retryWrites=true refused the connection",
        p=_draw(ALNUM, 18))
    add("curl -u deploy:{p} https://nexus.acme.dev/repository/releases/ -> "
        "curl https://deploy:{p}@nexus.acme.dev/ok", p=_draw(ALNUM, 15))
    add("Basic auth against the registry: Authorization: Basic {b}",
        b=base64.b64encode(f"ci:{_draw(ALNUM, 16)}".encode()).decode())
    add("file.edited: config/secrets.yaml\n+database:\n+  password: {p}\n+  pool: 5\n+api:\n+  secret_key: {s}",
        p=_draw(ALNUM, 14), s=_draw(HEX, 64))
    add('file.edited: appsettings.json\n{{"Db": {{"User": "app", "Password": "{p}"}}, '
        '"Jwt": {{"SigningKey": "{s}"}}}}', p=_draw(ALNUM, 12), s=_draw(B64, 44))
    add("psql \"host=db.internal port=5432 dbname=prod user=app password={p} sslmode=require\" failed",
        p=_draw(ALNUM, 13))
    add("mysql -u root --password={p} -h 127.0.0.1 shop < dump.sql", p=_draw(ALNUM, 12))
    add("file.edited: docker-compose.yml\n+    environment:\n+      POSTGRES_PASSWORD: {p}\n"
        "+      REDIS_PASSWORD: {r}", p=_draw(ALNUM, 16), r=_draw(ALNUM, 16))
    add("Task complete: rotated the key; new .env line is DJANGO_SECRET_KEY='{s}'", s=_draw(ALNUM + "!@%^*-_", 50))
    add('requests.post(url, data={{"username": "svc", "password": "{p}"}}) -> 500', p=_draw(ALNUM, 14))
    add("POST /oauth/token grant_type=client_credentials&client_id=web&client_secret={s} -> 401",
        s=_draw(ALNUM, 32))
    add("GET https://api.acme.dev/v2/export?api_key={k}&format=csv timed out", k=_draw(ALNUM, 32))
    add("diff --git a/src/config.ts b/src/config.ts\n-const apiKey = process.env.API_KEY;\n"
        "+const apiKey = \"{k}\";", k=_draw(HEX, 32))
    add("npm publish failed: 403; ~/.npmrc has //registry.npmjs.org/:_authToken={t}",
        t="npm_" + _draw(ALNUM, 36))
    add("twine upload: password {t} rejected by PyPI", t="pypi-AgEIcHlwaS5vcmc" + _draw(URLSAFE, 60))
    add("SendGrid mail failed for key {k}", k="SG." + _draw(URLSAFE, 22) + "." + _draw(URLSAFE, 43))
    add("ssh: Permission denied. <private>staging root password is {p}</private> Retrying with the deploy key.",
        p=_draw(ALNUM, 12))
    return events


def _ordinary_events() -> list[str]:
    paths = ["src/api/routes/users.ts", "containers/opencode-server/graphiti/memory_manager.py",
             "tests/test_queue.py", "web/components/Button.tsx", "pkg/cache/lru.go", "docs/adr/0007-queue.md",
             "infra/terraform/main.tf", "scripts/release.sh", "src/auth/token_store.py", "lib/parser/lexer.rs",
             "config/settings.example.yaml", "src/keys/KeyboardShortcuts.tsx", "api/secret_rotation.md"]
    tests = ["test_store_returns_episode_name", "test_cached_query_is_served_from_valkey",
             "TestTokenizer::test_splits_unicode", "it('renders the password field masked')",
             "test_api_key_missing_fails_early", "TestAuthMiddleware.test_rejects_expired_tokens",
             "test_secret_rotation_schedules_job", "should refresh the access token before expiry"]
    templates = [
        lambda: f"file.edited: {_random.choice(paths)} (+{_random.randint(1, 90)} -{_random.randint(0, 40)})",
        lambda: f"git commit {_draw(HEX, 40)}: fix off-by-one in pagination",
        lambda: f"Merged {_draw(HEX, 7)} into main; rebased {_draw(HEX, 12)} onto origin/main",
        lambda: f"Created job {uuid.UUID(int=_random.getrandbits(128))} for tenant {uuid.UUID(int=_random.getrandbits(128))}",
        lambda: f"pytest: {_random.randint(100, 400)} passed, 1 failed: {_random.choice(tests)} (AssertionError)",
        lambda: f"Bumped react from 18.{_random.randint(0, 3)}.{_random.randint(0, 9)} to 19.0.{_random.randint(0, 5)} "
                f"and typescript to 5.{_random.randint(3, 7)}.{_random.randint(2, 4)}",
        lambda: f"Changed the primary colour from #{_draw(HEX, 6)} to #{_draw(HEX, 6)} in theme.css",
        lambda: "file.edited: src/icons.ts\n+export const LOGO = \"data:image/png;base64,"
                + base64.b64encode(_random.randbytes(96)).decode() + "\";",
        lambda: f"const checksum = \"{_draw(HEX, 64)}\"; // sha256 of the release tarball",
        lambda: f"docker pull ghcr.io/acme/api@sha256:{_draw(HEX, 64)}",
        lambda: "session.error: TypeError: Cannot read properties of undefined (reading 'token') at "
                f"refreshSession ({_random.choice(paths)}:{_random.randint(10, 400)}:{_random.randint(1, 40)})",
        lambda: "Explained the flow: the client exchanges the authorization code for an access token, stores "
                "the refresh token in an httpOnly cookie and never logs either.",
        lambda: "file.edited: src/auth/login.ts\n+  const token = await getToken(user);\n"
                "+  if (!token) throw new AuthError('password or token invalid');",
        lambda: "file.edited: settings.py\n+API_KEY = os.environ[\"API_KEY\"]\n+SECRET_KEY = env(\"SECRET_KEY\")",
        lambda: "Added validation: passwords must be at least 12 characters; tokens expire after 15 minutes.",
        lambda: f"MAX_TOKENS={_random.choice([512, 1024, 4096])} and TOKEN_LIMIT is enforced per request",
        lambda: "export GITHUB_TOKEN=$(gh auth token) && gh release create v" + f"{_random.randint(1, 4)}.{_random.randint(0, 20)}.0",
        lambda: f"Opened https://github.com/acme/web/pull/{_random.randint(100, 9999)} and "
                f"https://github.com/acme/web/commit/{_draw(HEX, 40)}",
        lambda: f"GET /api/v1/users/{uuid.UUID(int=_random.getrandbits(128))}?include=teams&page={_random.randint(1, 9)} "
                f"-> 200 in {_random.randint(3, 300)} ms",
        lambda: "Refactored the tokenizer: tokenize(text) now returns Token objects with start/end offsets.",
        lambda: f"file.edited: package-lock.json: \"integrity\": \"sha512-{base64.b64encode(_random.randbytes(64)).decode()}\"",
        lambda: f"CI run {_random.randint(1000, 99999)} green on node 20.{_random.randint(0, 15)}.{_random.randint(0, 9)}; "
                f"cache key linux-npm-{_draw(HEX, 16)}",
        lambda: "Read the docs on key rotation: rotate the signing key yearly and keep the old public key for verification.",
        lambda: f"kubectl rollout status deploy/api -n prod: replica set api-{_draw('bcdfghjklmnpqrstvwxz2456789', 10)} "
                "updated",
        lambda: "file.edited: src/keys/KeyboardShortcuts.tsx\n+  { key: 'Escape', action: closeModal },",
        lambda: f"Wrote test {_random.choice(tests)}: mocks the secret manager and asserts the rotation job runs",
        lambda: "password_reset: the email link carries a one-time code; the handler compares hashes in constant time",
        lambda: f"Profiled the query: {_random.randint(20, 900)} ms p50, index on users(email) added, "
                f"EXPLAIN shows Index Scan using users_email_idx",
        lambda: f"go test ./... : ok github.com/acme/api/pkg/cache {_random.random():.3f}s",
        lambda: "file.edited: .env.example\n+DATABASE_URL=postgres://localhost:5432/dev\n+OPENAI_API_KEY=\n"
                "+LOG_LEVEL=info",
    ]
    return [_random.choice(templates)() for _ in range(240)]


CREDENTIAL_EVENTS = _credential_events()
ORDINARY_EVENTS = _ordinary_events()
