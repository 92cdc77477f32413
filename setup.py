import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in eexit/__init__.py only (read as text: importing the package here would
# need its dependencies at build time).
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("eexit").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="eexit",
    version=VERSION,
    description="Fail-closed emergency exit for automated trading: watchdog, exit worker, exit brain",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["eexit", "eexit.*"]),
    install_requires=[
        "redis>=5.0",
        "ccxt>=4.5.0",
    ],
    # The tests need nothing beyond the stdlib and the runtime dependencies: a real
    # redis-server binary comes from the OS (see README), not from pip.
    extras_require={"test": []},
    entry_points={"console_scripts": ["eexit = eexit.cli:main"]},
)
