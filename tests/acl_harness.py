"""redis-server with the shipped ACL, rendered exactly as tools/install_offline.py renders it,
plus an admin user that exists only in tests (to seed and inspect)."""

import importlib.util
from pathlib import Path

from tests.harness import RedisServer, RedisTestCase

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("install_offline", ROOT / "tools/install_offline.py")
install_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_offline)

USERS = tuple(install_offline.redis_user(daemon) for daemon in install_offline.DAEMONS)
ADMIN = "test-admin"


def password(user):
    return f"pw-{user}-not-a-real-secret"


def rendered_acl():
    template = (ROOT / "systemd/redis-acl.conf").read_text()
    return install_offline.render_acl(template, {user: password(user) for user in USERS})


def write_acl_file(path):
    """The rendered ACL plus the test's admin user, at path; returns the rendered text."""
    rendered = rendered_acl()
    Path(path).write_text(rendered + f"user {ADMIN} on >{password(ADMIN)} ~* &* +@all\n")
    return rendered


def user_url(server, user):
    return server.url.replace("redis://", f"redis://{user}:{password(user)}@")


class AclRedisTestCase(RedisTestCase):
    """RedisTestCase on a redis-server that runs the shipped ACL; self.redis is the admin."""

    @classmethod
    def setUpClass(cls):
        server = RedisServer()
        cls.rendered = write_acl_file(Path(server.dir) / "users.acl")
        server.extra_args = ["--aclfile", str(Path(server.dir) / "users.acl")]
        cls.redis_server = server.start()
        cls.addClassCleanup(cls.redis_server.stop)

    def setUp(self):
        self.redis = self.client(ADMIN)
        self.redis.flushall()

    def client(self, user, **options):
        client = self.redis_server.client(username=user, password=password(user), **options)
        self.addCleanup(client.close)
        return client
