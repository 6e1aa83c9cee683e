import os

from setuptools import find_packages, setup


def _tree(top):
    """data_files installing the top-level directory top as <prefix>/share/roller/<top>."""
    return [(os.path.join("share", "roller", path), [os.path.join(path, f) for f in sorted(files)])
            for path, _, files in sorted(os.walk(top)) if files]


setup(
    name="roller",
    version="0.1.0",
    description="roller, the Release Operations Controller: one Twisted process that pings, "
    "reboots, power-cycles and re-images CI machines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["roller", "roller.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/roller_plugin.py"], "roller": ["version.json"]},
    include_package_data=True,
    data_files=_tree("templates") + _tree("static"),
    install_requires=[
        "twisted[tls,conch]>=24.7,<27",
        "klein>=24.8,<25",
        "treq>=24.9,<27",
        # roller.drivers.snmp.ber swaps names inside pysnmp and reads pyasn1's storage
        # (ber.PINNED): capped to the minor versions those fast paths were checked against.
        "pysnmp>=7.1,<7.2",
        "pyasn1>=0.6,<0.7",
        "pyOpenSSL>=24",  # roller.http_client (TLS errors, CA files)
        "cryptography>=42",  # roller.sim (host keys of the simulated fleet)
        "markupsafe>=2.1",  # roller.web
        "jinja2>=3.1,<4",
        "attrs>=23.2",
        "zope.interface>=6",
        "werkzeug>=3",
        "tomli-w>=1.0,<2",
        "mohawk>=1.1,<2",
        "prometheus_client>=0.17",
    ],
    extras_require={
        # database.url = "postgresql://...": the store on PostgreSQL (roller.store.pg)
        "postgresql": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "schemathesis>=4,<5",
            "openapi-spec-validator>=0.7",
            "mohawk>=1.1",
            "taskcluster>=60",
            "sushy-tools>=2.2,<3",
            "playwright>=1.40",  # drives Debian's chromium; never `playwright install`
            "psutil>=5.9",
            "psycopg[binary]>=3.1",  # the store's tests also run on PostgreSQL
            # tests/test_dev_install.py builds an editable install without build isolation (bdist_wheel)
            "setuptools>=70.1",
            # the static gates `make test` runs before the suite (configured in pyproject.toml)
            "ruff==0.17.6",
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
        ],
    },
    entry_points={"console_scripts": ["roller = roller.cli:main"]},
    classifiers=["Framework :: Twisted", "Programming Language :: Python :: 3"],
)
