"""config.settings(): every setting declared once, as a dataclass field beside its variable
name and bounds, read by the type of its default; nested classes and a default that follows
another setting; a bad value is a ConfigError naming the variable."""

import unittest
from dataclasses import dataclass

from eexit.config import ConfigError, nested, setting, settings


@dataclass(frozen=True)
class Inner:
    lost_s: float = setting("EEXIT_T_LOST_S", 5.0, 0.01, 600)
    grace_s: float = setting("EEXIT_T_GRACE_S", 5.0, 0.0, 600, default_from="lost_s")


def even(number):
    """A rule the bounds cannot say (check=)."""
    if number % 2:
        raise ConfigError(f"EEXIT_T_EVEN={number} is odd")
    return number


@dataclass(frozen=True)
class Outer:
    inner: Inner = nested(Inner)
    name: str = setting("EEXIT_T_NAME", "exit_brain")
    count: int = setting("EEXIT_T_COUNT", 25, 1, 100)
    flag: bool = setting("EEXIT_T_FLAG", False)
    issuers: tuple = setting("EEXIT_T_ISSUERS", ("watchdog", "ops"),
                             choices=("watchdog", "ops", "risk_kernel"))
    policy: str = setting("EEXIT_T_POLICY", "enforce", choices=("enforce", "alert"))
    even: int = setting("EEXIT_T_EVEN", 2, 0, 10, check=even)
    from_env = classmethod(settings)


class SettingsTest(unittest.TestCase):
    def test_defaults_are_the_dataclass_defaults(self):
        self.assertEqual(Outer.from_env({}), Outer())

    def test_each_type_is_read_as_its_default(self):
        cfg = Outer.from_env({"EEXIT_T_NAME": " bot ", "EEXIT_T_COUNT": "7", "EEXIT_T_FLAG": "yes",
                              "EEXIT_T_ISSUERS": "ops, risk_kernel", "EEXIT_T_LOST_S": "0.5",
                              "EEXIT_T_POLICY": "alert", "EEXIT_T_EVEN": "4"})
        self.assertEqual((cfg.name, cfg.count, cfg.flag, cfg.issuers, cfg.policy, cfg.even),
                         ("bot", 7, True, ("ops", "risk_kernel"), "alert", 4))
        self.assertEqual(cfg.inner, Inner(lost_s=0.5, grace_s=0.5))     # the grace follows the threshold
        self.assertEqual(Outer.from_env({"EEXIT_T_LOST_S": "0.5", "EEXIT_T_GRACE_S": "0"}).inner.grace_s, 0.0)

    def test_a_bad_value_names_the_variable(self):
        for env, name in (({"EEXIT_T_COUNT": "1.5"}, "EEXIT_T_COUNT"), ({"EEXIT_T_COUNT": "101"}, "EEXIT_T_COUNT"),
                          ({"EEXIT_T_LOST_S": "soon"}, "EEXIT_T_LOST_S"),
                          ({"EEXIT_T_FLAG": "maybe"}, "EEXIT_T_FLAG"),
                          ({"EEXIT_T_ISSUERS": "ops,watchdgo"},
                           "EEXIT_T_ISSUERS='ops,watchdgo': watchdgo is not one of"),
                          ({"EEXIT_T_POLICY": "warn"}, "EEXIT_T_POLICY='warn' is not one of enforce,alert"),
                          ({"EEXIT_T_EVEN": "3"}, "EEXIT_T_EVEN=3 is odd")):
            with self.subTest(env=env), self.assertRaisesRegex(ConfigError, name):
                Outer.from_env(env)


if __name__ == "__main__":
    unittest.main()
