from setuptools import find_packages, setup

setup(
    name="eexit",
    version="0.1.0",
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
