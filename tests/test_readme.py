"""The configuration the README shows is configuration roller accepts."""

import re
from pathlib import Path

import pytest

from roller.config import ConfigError, load_settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)


def test_the_readme_has_its_configuration_examples():
    assert any("[server]" in b and "[queue]" in b for b in BLOCKS)
    assert any("[[notify.rules]]" in b for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if "[credentials." not in b and "[clients." not in b],
                         ids=lambda b: b.strip().splitlines()[0][:40])
def test_each_configuration_example_loads(tmp_path, block):
    path = tmp_path / "roller.toml"
    if "\"ssl:" in block:
        # the TLS example names key files of a real host; tests/test_tls.py runs TLS for real
        with pytest.raises(ConfigError, match=r"server\.listen .*No such file or directory: '/etc/roller/"):
            load_settings(str(_write(path, block)), {}, {})
        return
    load_settings(str(_write(path, block)), {}, {})  # raises ConfigError naming the key otherwise


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
