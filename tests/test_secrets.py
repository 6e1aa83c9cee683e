"""Tests for L{roller.secrets}."""

from __future__ import annotations

import os
import stat

import pytest

from roller.errors import ValidationError
from roller.secrets import (
    Credential,
    CredentialConflict,
    Secrets,
    SecretsError,
    UnknownCredential,
    load_secrets,
    write_secrets,
)

GOOD = """\
[credentials.ipmi-admin]
type = "password"
username = "admin"
password = "pw-Hunter2-ipmi"

[credentials.ssh-relops]
type = "ssh-key"
path = "/etc/roller/keys/relops_ed25519"
passphrase = "pp-Sekrit-phrase"

[credentials.snmp-legacy]
type = "snmp-community"
community = "cm-PrivateCommunity"
read_community = "cm-PublicRead"

[credentials."snmp-v3.pdu"]
type = "snmp-v3"
user = "roller"
auth_protocol = "sha256"
auth_key = "ak-AuthKey-12345"
priv_protocol = "AES"
priv_key = "pk-PrivKey-12345"

[credentials.bugzilla]
type = "token"
value = "tk-ApiToken-XYZ"
"""

SECRETS = {
    "pw-Hunter2-ipmi", "pp-Sekrit-phrase", "cm-PrivateCommunity", "cm-PublicRead",
    "ak-AuthKey-12345", "pk-PrivKey-12345", "tk-ApiToken-XYZ",
}


def write(tmp_path, text: str, mode: int = 0o600, name: str = "secrets.toml"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def refused(path) -> SecretsError:
    with pytest.raises(SecretsError) as info:
        load_secrets(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert_no_secret(message)
    return info.value


# -- loading


def test_load_all_kinds(tmp_path):
    secrets = load_secrets(write(tmp_path, GOOD))
    assert secrets.names() == ("bugzilla", "ipmi-admin", "snmp-legacy", "snmp-v3.pdu", "ssh-relops")
    ipmi = secrets.get("ipmi-admin")
    assert (ipmi.kind, ipmi.username, ipmi.password) == ("password", "admin", "pw-Hunter2-ipmi")
    ssh = secrets.get("ssh-relops")
    assert (ssh.path, ssh.passphrase) == ("/etc/roller/keys/relops_ed25519", "pp-Sekrit-phrase")
    snmp = secrets.get("snmp-legacy")
    assert (snmp.community, snmp.read_community) == ("cm-PrivateCommunity", "cm-PublicRead")
    v3 = secrets.get("snmp-v3.pdu")
    assert (v3.user, v3.auth_protocol, v3.priv_protocol) == ("roller", "SHA256", "AES")
    assert secrets.get("bugzilla").value == "tk-ApiToken-XYZ"
    assert secrets.secret_values() == SECRETS
    assert "ipmi-admin" in secrets and "nope" not in secrets and 3 not in secrets
    assert len(secrets) == 5


def test_mode_0600_accepted_0400_accepted(tmp_path):
    assert len(load_secrets(write(tmp_path, GOOD, 0o600))) == 5
    assert len(load_secrets(write(tmp_path, GOOD, 0o400, "ro.toml"))) == 5


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601])
def test_group_or_world_access_refused(tmp_path, mode):
    error = refused(write(tmp_path, GOOD, mode))
    assert f"{mode:04o}" in str(error)
    assert "chmod 600" in str(error)


def test_missing_file_is_empty(tmp_path):
    secrets = load_secrets(tmp_path / "absent.toml")
    assert len(secrets) == 0
    assert secrets.names() == ()
    assert secrets.secret_values() == set()


def test_directory_refused(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    error = refused(d)
    assert "regular file" in str(error) or "cannot open" in str(error)


def test_unparsable_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.x]\ntype = "password"\npassword = pw-Hunter2-ipmi\n'))
    assert "not valid TOML" in str(error)
    assert "line 3" in str(error)


def test_not_utf8_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b'[credentials.x]\ntype = "token"\nvalue = "\xff\xfe"\n')
    os.chmod(path, 0o600)
    assert "UTF-8" in str(refused(path))


def test_unknown_type_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.x]\ntype = "kerberos"\nvalue = "tk-ApiToken-XYZ"\n'))
    assert "credentials.x.type" in str(error)
    assert "kerberos" in str(error)


def test_missing_type_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.x]\nvalue = "tk-ApiToken-XYZ"\n'))
    assert "credentials.x.type: is required" in str(error)


def test_missing_field_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.ipmi]\ntype = "password"\nusername = "admin"\n'))
    assert "credentials.ipmi.password: is required for type password" in str(error)


def test_ill_typed_field_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.ipmi]\ntype = "password"\nusername = "a"\npassword = 123456\n'))
    assert "credentials.ipmi.password: must be a string, got an integer" in str(error)
    assert "123456" not in str(error)


def test_field_of_other_type_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.t]\ntype = "token"\nvalue = "tk-ApiToken-XYZ"\n'
                                    'password = "pw-Hunter2-ipmi"\n'))
    assert "credentials.t.password: does not apply to type token" in str(error)


def test_unknown_key_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.t]\ntype = "token"\nvalue = "tk-ApiToken-XYZ"\nvalu = "x"\n'))
    assert "unknown key(s): valu" in str(error)


def test_unknown_top_level_refused(tmp_path):
    error = refused(write(tmp_path, '[credential.t]\ntype = "token"\nvalue = "tk-ApiToken-XYZ"\n'))
    assert "unknown top-level key(s) credential" in str(error)


def test_unquoted_dotted_name_hint(tmp_path):
    error = refused(write(tmp_path, '[credentials.ipmi-10.0.0.1]\ntype = "password"\n'
                                    'username = "a"\npassword = "pw-Hunter2-ipmi"\n'))
    assert "must be quoted" in str(error)


def test_bad_name_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials."has space"]\ntype = "token"\nvalue = "tk-ApiToken-XYZ"\n'))
    assert "credential name" in str(error)


def test_empty_secret_refused(tmp_path):
    error = refused(write(tmp_path, '[credentials.t]\ntype = "token"\nvalue = ""\n'))
    assert "credentials.t.value: must not be empty" in str(error)


@pytest.mark.parametrize("table, message", [
    ('auth_protocol = "SHA1024"\nauth_key = "ak-AuthKey-12345"', "unknown protocol"),
    ('auth_protocol = "SHA"', "auth_key: is required when auth_protocol is SHA"),
    ('auth_key = "ak-AuthKey-12345"', "auth_key: is set but auth_protocol is none"),
    ('auth_protocol = "SHA"\nauth_key = "short"', "at least 8 characters"),
    ('priv_protocol = "AES"\npriv_key = "pk-PrivKey-12345"', "privacy needs authentication"),
    ('auth_protocol = "MD5"\nauth_key = "ak-AuthKey-12345"\npriv_protocol = "3DES"\npriv_key = "pk-PrivKey-12345"',
     "unknown protocol"),
])
def test_snmp_v3_checks(tmp_path, table, message):
    error = refused(write(tmp_path, f'[credentials.v3]\ntype = "snmp-v3"\nuser = "roller"\n{table}\n'))
    assert message in str(error)


def test_snmp_v3_no_auth(tmp_path):
    secrets = load_secrets(write(tmp_path, '[credentials.v3]\ntype = "snmp-v3"\nuser = "roller"\n'
                                           'auth_protocol = "none"\n'))
    cred = secrets.get("v3")
    assert cred.auth_protocol == "none" and cred.auth_key is None


# -- the model


def test_repr_and_str_hide_secrets(tmp_path):
    secrets = load_secrets(write(tmp_path, GOOD))
    for name in secrets.names():
        cred = secrets.get(name)
        assert_no_secret(repr(cred))
        assert_no_secret(str(cred))
        assert_no_secret(f"{cred!r} {[cred]} {dict(c=cred)}")
    assert_no_secret(repr(secrets))
    assert "password=***" in repr(secrets.get("ipmi-admin"))
    assert "username='admin'" in repr(secrets.get("ipmi-admin"))


def test_public_json():
    cred = Credential("ipmi-x", "password", username="admin", password="pw-Hunter2-ipmi")
    assert cred.public_json() == {"name": "ipmi-x", "type": "password"}


def test_construction_validates():
    with pytest.raises(ValidationError) as info:
        Credential("x", "password", username="admin")
    assert info.value.field == "credentials.x.password"


def test_get_unknown():
    secrets = Secrets({}, path="/etc/roller/secrets.toml")
    with pytest.raises(UnknownCredential) as info:
        secrets.get("ipmi-nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "unknown credential 'ipmi-nope' in /etc/roller/secrets.toml"


def test_redact(tmp_path):
    secrets = load_secrets(write(tmp_path, GOOD))
    text = ("ipmitool -P pw-Hunter2-ipmi failed; snmpset -c cm-PrivateCommunity; "
            "token tk-ApiToken-XYZ and again pw-Hunter2-ipmi")
    out = secrets.redact(text)
    assert_no_secret(out)
    assert out == "ipmitool -P *** failed; snmpset -c ***; token *** and again ***"
    assert secrets.redact("nothing here") == "nothing here"


def test_redact_longest_first_and_escaped():
    secrets = Secrets({
        "a": Credential("a", "token", value="abc"),
        "b": Credential("b", "token", value="abcdef"),
        "c": Credential("c", "token", value="quo'te\\slash"),
    })
    assert secrets.redact("x abcdef y abc") == "x *** y ***"
    assert secrets.redact(repr("quo'te\\slash")) == '"***"'


# -- writing


def test_write_is_0600_and_round_trips(tmp_path):
    original = load_secrets(write(tmp_path, GOOD))
    target = tmp_path / "out.toml"
    old_umask = os.umask(0o022)
    try:
        write_secrets(target, original)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    again = load_secrets(target)
    assert again.as_dict() == original.as_dict()
    assert '[credentials."snmp-v3.pdu"]' in target.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_replaces_existing_loose_file(tmp_path):
    target = write(tmp_path, "junk", 0o644)
    write_secrets(target, {"t": Credential("t", "token", value="tk-ApiToken-XYZ")})
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert load_secrets(target).get("t").value == "tk-ApiToken-XYZ"


def test_write_failure_leaves_old_file(tmp_path, monkeypatch):
    target = write(tmp_path, GOOD)
    import roller.secrets as mod

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_secrets(target, {"t": Credential("t", "token", value="tk-ApiToken-XYZ")})
    assert target.read_text() == GOOD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.toml"]


def test_write_empty(tmp_path):
    write_secrets(tmp_path / "s.toml", Secrets())
    assert len(load_secrets(tmp_path / "s.toml")) == 0


def test_write_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError):
        write_secrets(tmp_path / "s.toml", {"a": Credential("b", "token", value="v")})


# -- merging


def test_merged_adds_and_keeps_same():
    a = Credential("a", "token", value="tk-ApiToken-XYZ")
    b = Credential("b", "password", username="u", password="pw-Hunter2-ipmi")
    secrets = Secrets({"a": a}, path="/x")
    merged = secrets.merged({"a": Credential("a", "token", value="tk-ApiToken-XYZ"), "b": b})
    assert merged.names() == ("a", "b")
    assert merged.path == "/x"
    assert secrets.names() == ("a",)  # unchanged


def test_merged_refuses_conflict():
    secrets = Secrets({"a": Credential("a", "token", value="tk-ApiToken-XYZ")})
    new = {"a": Credential("a", "token", value="pw-Hunter2-ipmi"),
           "c": Credential("c", "token", value="x")}
    assert secrets.conflicts(new) == ("a",)
    with pytest.raises(CredentialConflict) as info:
        secrets.merged(new)
    assert info.value.names == ("a",)
    assert_no_secret(str(info.value))
    replaced = secrets.merged(new, replace=True)
    assert replaced.get("a").value == "pw-Hunter2-ipmi"
    assert "c" in replaced
