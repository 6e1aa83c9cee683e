"""Tests for L{roller.legacy_import}."""

from __future__ import annotations

import copy
import json

import pytest

from roller.errors import ValidationError
from roller.inventory import IpmiAccess, Machine, PduAccess, SshAccess, XenAccess
from roller.legacy_import import (
    ImportEntry,
    ImportFormatError,
    ImportPlan,
    detect_format,
    plan_import,
)
from roller.secrets import Credential

# Literal copies of seed/legacy-formats/*.json (tests must not read /work/shared).
SEED_IPMI = {
    "types": {
        "moonshot": {
            "args": ["-B 0", "-b 7"],
            "map": {
                "c1n1": ["-T 0x82", "-t 0x72"],
                "c2n1": ["-T 0x84", "-t 0x72"],
                "c3n1": ["-T 0x86", "-t 0x72"],
            },
            "commands": {
                "ipmi_list": ["sel", "list", "last", "15"],
                "ipmi_status": ["chassis", "power", "status"],
                "ipmi_reset": ["chassis", "power", "reset"],
                "ipmi_cycle": ["chassis", "power", "cycle"],
                "ipmi_off": ["chassis", "power", "off"],
                "ipmi_on": ["chassis", "power", "on"],
            },
        }
    },
    "10.49.16.17": {"ipmi": {"user": "username", "password": "password", "type": "moonshot"}},
    "10.49.58.3": {"ipmi": {"ip": "10.49.16.17", "addr": "c3n1"}},
}

SEED_XEN = {
    "test_tc_worker_id.test.releng.dne-dc-1.mozilla.com": {"xen_uuid": "test_xen_vm_uuid"},
}

IPMI_PASSWORD = "Ipmi-S3cret-pw!"
COMMUNITY = "Snmp-C0mmunity-rw"
SECRETS = (IPMI_PASSWORD, COMMUNITY)

WORKER_CONFIG = {
    "servers": {
        "t-w1064-ms-001": {
            "ssh": {"user": "cltbld", "key_file": "/home/relops/.ssh/win_worker.pem"},
            "pdu": "pdu1.r201-1.ops.mdc1.mozilla.com:AA8",
            "bug_cc": "relops@example.com, ci@example.com",
            "fqdn": "t-w1064-ms-001.wintest.releng.mdc1.mozilla.com",
            "ipmi": {"ip": "10.49.16.17", "addr": "c1n1"},
        },
        "moon-chassis-1": {
            "ip": "10.49.16.17",
            "ipmi": {"user": "admin", "password": IPMI_PASSWORD, "type": "moonshot"},
        },
        "t-linux-xen-01": {
            "ssh": {"user": "root", "key_file": "/home/relops/.ssh/win_worker.pem"},
            "xen": {"xen_uuid": "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"},
            "ip": "10.49.40.5",
        },
        "t-rack-01": {
            "ip": "10.49.70.2",
            "ipmi": {"user": "root", "password": IPMI_PASSWORD, "ip": "10.49.70.102"},
            "pdu": "pdu2.ops.mdc1.mozilla.com:AB12",
        },
    },
    "types": copy.deepcopy(SEED_IPMI["types"]),
    "snmp_community_string": COMMUNITY,
}


def by_key(plan: ImportPlan) -> dict[str, ImportEntry]:
    return {e.source_key: e for e in plan.entries}


def assert_no_secrets(plan: ImportPlan, secrets=SECRETS) -> None:
    dumped = json.dumps(plan.to_json())
    for secret in secrets:
        assert secret not in dumped
        assert secret not in plan.summary()
        for entry in plan.entries:
            assert secret not in entry.reason
            assert secret not in repr(entry)
    assert all(secret not in repr(plan) for secret in secrets)


def existing_of(*machines: Machine) -> dict:
    return {m.key: m for m in machines}


# -- detect_format


def test_detect_format():
    assert detect_format(SEED_IPMI) == "ipmi"
    assert detect_format(SEED_XEN) == "xen"
    assert detect_format(WORKER_CONFIG) == "worker_config"
    assert detect_format({"types": {}}) == "ipmi"


@pytest.mark.parametrize("data, message", [
    ([1, 2], "holds a JSON object, got a list"),
    ("text", "holds a JSON object, got a string"),
    (None, "holds a JSON object, got null"),
    ({}, "empty object"),
    ({"a": {"b": 1}}, "not a known legacy inventory format"),
    ({"a": {"ipmi": {}}, "b": {"xen_uuid": "x"}}, "mixes"),
])
def test_detect_format_errors(data, message):
    with pytest.raises(ImportFormatError) as info:
        detect_format(data)
    assert message in info.value.message
    with pytest.raises(ImportFormatError):
        plan_import(data, {}, "legacy")


# -- ipmi.json


def test_seed_ipmi():
    plan = plan_import(SEED_IPMI, {}, "legacy")
    assert plan.format == "ipmi"
    assert [(e.source_key, e.action) for e in plan.entries] == [
        ("10.49.16.17", "skipped"),
        ("10.49.58.3", "imported"),
    ]
    chassis, cartridge = plan.entries
    assert chassis.reason == "chassis BMC for 1 cartridge; credential stored as ipmi-10.49.16.17"
    assert chassis.machine is None
    m = cartridge.machine
    assert m.key == ("legacy", "10-49-58-3")
    assert m.ip == "10.49.58.3" and m.fqdn is None
    assert m.ipmi == IpmiAccess(
        host="10.49.16.17",
        credential="ipmi-10.49.16.17",
        bridge=("-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72"),
    )
    assert cartridge.reason == "new machine legacy/10-49-58-3"
    assert plan.credentials == {
        "ipmi-10.49.16.17": Credential("ipmi-10.49.16.17", "password", username="username", password="password"),
    }
    assert any("commands" in n for n in plan.notes)
    assert plan.summary() == "1 imported, 0 updated, 0 unchanged, 0 rejected, 1 skipped; 1 credential(s)"
    assert plan.machines() == (m,)


def test_seed_ipmi_to_json():
    out = plan_import(SEED_IPMI, {}, "legacy").to_json()
    json.dumps(out)
    assert out["counts"] == {"imported": 1, "updated": 0, "unchanged": 0, "rejected": 0, "skipped": 1}
    assert out["credentials"] == [{"name": "ipmi-10.49.16.17", "type": "password"}]
    assert out["entries"][1]["machine"]["ipmi"]["bridge"] == ["-B", "0", "-b", "7", "-T", "0x86", "-t", "0x72"]
    # the machine JSON is what the API accepts
    assert Machine.from_json(out["entries"][1]["machine"]) == plan_import(SEED_IPMI, {}, "legacy").entries[1].machine
    assert "username" not in json.dumps(out)


def test_ipmi_no_secret_leaks():
    data = copy.deepcopy(SEED_IPMI)
    data["10.49.16.17"]["ipmi"]["password"] = IPMI_PASSWORD
    data["10.49.16.18"] = {"ipmi": {"user": "u", "password": IPMI_PASSWORD, "type": "nope"}}
    plan = plan_import(data, {}, "legacy")
    assert plan.credentials["ipmi-10.49.16.17"].password == IPMI_PASSWORD
    assert by_key(plan)["10.49.16.18"].action == "rejected"
    assert_no_secrets(plan)


def test_ipmi_standalone_bmc_is_machine():
    data = {"types": SEED_IPMI["types"],
            "10.0.0.5": {"ipmi": {"user": "root", "password": IPMI_PASSWORD}},
            "10.0.0.6": {"ipmi": {"user": "root", "password": IPMI_PASSWORD, "type": "moonshot"}}}
    plan = plan_import(data, {}, "g1")
    for key in ("10.0.0.5", "10.0.0.6"):
        entry = by_key(plan)[key]
        assert entry.action == "imported"
        assert entry.machine.ipmi == IpmiAccess(host=key, credential=f"ipmi-{key}")
        assert entry.machine.ip == key
        assert entry.machine.worker_group == "g1"
    assert sorted(plan.credentials) == ["ipmi-10.0.0.5", "ipmi-10.0.0.6"]
    assert_no_secrets(plan)


def test_ipmi_chassis_counts_cartridges():
    data = copy.deepcopy(SEED_IPMI)
    data["10.49.58.1"] = {"ipmi": {"ip": "10.49.16.17", "addr": "c1n1"}}
    plan = plan_import(data, {}, "legacy")
    assert by_key(plan)["10.49.16.17"].reason.startswith("chassis BMC for 2 cartridges;")
    assert by_key(plan)["10.49.58.1"].machine.ipmi.bridge == ("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72")


@pytest.mark.parametrize("entry, reason", [
    ({"ipmi": {"ip": "10.49.16.17", "addr": "c9n9"}},
     "ipmi.addr: unknown cartridge address 'c9n9' for IPMI type 'moonshot' (known: c1n1, c2n1, c3n1)"),
    ({"ipmi": {"ip": "10.9.9.9", "addr": "c1n1"}},
     "ipmi.ip: chassis BMC 10.9.9.9 is not in the file (no entry with its user and password)"),
    ({"ipmi": {"ip": "10.49.16.17", "addr": "c1n1", "type": "blade"}},
     "ipmi.type: unknown IPMI type 'blade' (known: moonshot)"),
    ({"ipmi": {"addr": "c1n1"}}, "ipmi.ip: a cartridge (ipmi.addr) needs the IP of its chassis BMC"),
    ({"ipmi": {"user": "root"}}, "ipmi.password: is required"),
    ({"ipmi": {"user": "root", "password": 1234}}, "ipmi.password: must be a string, got an integer"),
    ({"ipmi": {"user": "root", "password": "x", "type": "blade"}},
     "ipmi.type: unknown IPMI type 'blade' (known: moonshot)"),
    ({"ipmi": ["x"]}, "ipmi: must be an object, got a list"),
    ({"rack": "r201"}, "entry has no 'ipmi' section"),
    ("10.0.0.1", "entry must be an object, got a string"),
    (None, "entry must be an object, got null"),
])
def test_ipmi_rejected(entry, reason):
    data = copy.deepcopy(SEED_IPMI)
    data["10.49.99.1"] = entry
    plan = plan_import(data, {}, "legacy")
    rejected = by_key(plan)["10.49.99.1"]
    assert rejected.action == "rejected"
    assert rejected.reason == reason
    assert rejected.machine is None
    # the others are unaffected
    assert by_key(plan)["10.49.58.3"].action == "imported"
    assert "1234" not in json.dumps(plan.to_json())


def test_ipmi_cartridge_of_unusable_chassis():
    data = copy.deepcopy(SEED_IPMI)
    del data["10.49.16.17"]["ipmi"]["password"]
    plan = plan_import(data, {}, "legacy")
    assert by_key(plan)["10.49.16.17"].reason == "ipmi.password: is required"
    assert by_key(plan)["10.49.58.3"].reason == (
        "ipmi.ip: the entry of chassis BMC 10.49.16.17 is unusable (ipmi.password: is required)")
    assert plan.credentials == {}
    assert plan.counts()["rejected"] == 2


def test_ipmi_type_without_map():
    data = {"types": {"plain": {"args": ["-B 0"]}},
            "10.0.0.1": {"ipmi": {"user": "u", "password": IPMI_PASSWORD, "type": "plain"}},
            "10.0.0.2": {"ipmi": {"ip": "10.0.0.1", "addr": "c1n1"}}}
    plan = plan_import(data, {}, "legacy")
    assert by_key(plan)["10.0.0.1"].action == "imported"  # not a chassis: its type maps nothing
    assert by_key(plan)["10.0.0.2"].reason == "ipmi.addr: IPMI type 'plain' has no cartridge map"


def test_ipmi_bad_types_table():
    with pytest.raises(ImportFormatError) as info:
        plan_import({"types": [1], "10.0.0.1": {"ipmi": {}}}, {}, "legacy")
    assert "'types' must be an object" in info.value.message


def test_ipmi_ignored_fields_are_reported():
    data = copy.deepcopy(SEED_IPMI)
    data["10.49.58.3"]["ipmi"]["password"] = IPMI_PASSWORD
    data["10.49.58.3"]["rack"] = "r201"
    entry = by_key(plan_import(data, {}, "legacy"))["10.49.58.3"]
    assert entry.action == "imported"
    assert entry.reason == "new machine legacy/10-49-58-3; ignored field(s): rack; ignored ipmi field(s): password"


def test_invalid_bmc_host_reads_like_the_api():
    data = {"servers": {"w1": {"ipmi": {"user": "u", "password": IPMI_PASSWORD, "ip": "bad host!"}}}}
    entry = plan_import(data, {}, "legacy").entries[0]
    assert entry.action == "rejected"
    with pytest.raises(ValidationError) as info:
        Machine.from_json({"worker_id": "x", "worker_group": "g", "ipmi": {"host": "bad host!"}})
    assert entry.reason == info.value.message
    assert entry.reason == "ipmi.host: 'bad host!' is neither an IP address nor a host name"


def test_invalid_worker_id_reads_like_the_api():
    entry = plan_import({"bad host!": {"xen_uuid": "u"}}, {}, "legacy").entries[0]
    assert (entry.action, entry.reason) == ("rejected", "worker_id: worker id 'bad host!' is not valid")


def test_seed_placeholder_password_does_not_mangle_reasons():
    data = copy.deepcopy(SEED_IPMI)  # its password is literally "password"
    del data["10.49.16.17"]["ipmi"]["user"]
    data["10.49.16.18"] = {"ipmi": {"user": "u", "password": "password", "x": "password"}}
    plan = plan_import(data, {}, "legacy")
    assert by_key(plan)["10.49.16.17"].reason == "ipmi.user: is required"
    assert by_key(plan)["10.49.16.18"].reason == "new machine legacy/10-49-16-18; ignored ipmi field(s): x"


# -- xen.json


def test_seed_xen():
    plan = plan_import(SEED_XEN, {}, "legacy")
    assert plan.format == "xen"
    (entry,) = plan.entries
    assert entry.action == "imported"
    assert entry.source_key == "test_tc_worker_id.test.releng.dne-dc-1.mozilla.com"
    m = entry.machine
    assert m.key == ("legacy", "test_tc_worker_id")
    assert m.fqdn == "test_tc_worker_id.test.releng.dne-dc-1.mozilla.com"
    assert m.xen == XenAccess(vm_uuid="test_xen_vm_uuid")
    assert plan.credentials == {}
    assert plan.notes == ()


def test_xen_ip_key_and_rejections():
    data = {
        "10.49.40.7": {"xen_uuid": "uuid-7"},
        "host.example.com": {"xen_uuid": 7},
        "other.example.com": {"uuid": "x"},
        "list.example.com": [],
    }
    plan = plan_import(data, {}, "legacy", format="xen")
    entries = by_key(plan)
    assert entries["10.49.40.7"].machine.worker_id == "10-49-40-7"
    assert entries["10.49.40.7"].machine.ip == "10.49.40.7"
    assert entries["host.example.com"].reason == "xen.vm_uuid: must be a string, got an integer"
    assert entries["other.example.com"].reason == "xen_uuid: is required"
    assert entries["list.example.com"].reason == "entry must be an object, got a list"


# -- WORKER_CONFIG


def test_worker_config():
    plan = plan_import(WORKER_CONFIG, {}, "legacy")
    assert plan.format == "worker_config"
    entries = by_key(plan)
    assert [e.source_key for e in plan.entries] == list(WORKER_CONFIG["servers"])
    assert {k: e.action for k, e in entries.items()} == {
        "t-w1064-ms-001": "imported",
        "moon-chassis-1": "skipped",
        "t-linux-xen-01": "imported",
        "t-rack-01": "imported",
    }
    assert entries["moon-chassis-1"].reason == "chassis BMC for 1 cartridge; credential stored as ipmi-10.49.16.17"

    ms = entries["t-w1064-ms-001"].machine
    assert ms.key == ("legacy", "t-w1064-ms-001")
    assert ms.fqdn == "t-w1064-ms-001.wintest.releng.mdc1.mozilla.com"
    assert ms.ssh == SshAccess(user="cltbld", credential="ssh-win_worker")
    assert ms.pdu == PduAccess(host="pdu1.r201-1.ops.mdc1.mozilla.com", outlet="AA8", model="sentry3",
                               credential="snmp-legacy")
    assert ms.ipmi == IpmiAccess(host="10.49.16.17", credential="ipmi-10.49.16.17",
                                 bridge=("-B", "0", "-b", "7", "-T", "0x82", "-t", "0x72"))
    assert ms.bug_cc == ("relops@example.com", "ci@example.com")

    xen = entries["t-linux-xen-01"].machine
    assert xen.xen == XenAccess(vm_uuid="0b1c2d3e-aaaa-bbbb-cccc-0123456789ab")
    assert xen.ssh == SshAccess(user="root", credential="ssh-win_worker")
    assert xen.ip == "10.49.40.5"

    rack = entries["t-rack-01"].machine
    assert rack.ipmi == IpmiAccess(host="10.49.70.102", credential="ipmi-10.49.70.102")
    assert rack.pdu.outlet == "AB12"

    assert plan.credentials == {
        "ssh-win_worker": Credential("ssh-win_worker", "ssh-key", path="/home/relops/.ssh/win_worker.pem"),
        "snmp-legacy": Credential("snmp-legacy", "snmp-community", community=COMMUNITY),
        "ipmi-10.49.16.17": Credential("ipmi-10.49.16.17", "password", username="admin", password=IPMI_PASSWORD),
        "ipmi-10.49.70.102": Credential("ipmi-10.49.70.102", "password", username="root", password=IPMI_PASSWORD),
    }
    assert plan.summary() == "3 imported, 0 updated, 0 unchanged, 0 rejected, 1 skipped; 4 credential(s)"
    assert_no_secrets(plan)


def test_worker_config_standalone_bmc_defaults_to_own_ip():
    data = {"servers": {"w1": {"ip": "10.1.1.1", "ipmi": {"user": "u", "password": IPMI_PASSWORD}}}}
    (entry,) = plan_import(data, {}, "legacy").entries
    assert entry.machine.ipmi == IpmiAccess(host="10.1.1.1", credential="ipmi-10.1.1.1")


def test_worker_config_chassis_with_other_access_is_a_machine():
    data = copy.deepcopy(WORKER_CONFIG)
    data["servers"]["moon-chassis-1"]["pdu"] = "pdu9.example.com:AA1"
    entry = by_key(plan_import(data, {}, "legacy"))["moon-chassis-1"]
    assert entry.action == "imported"
    assert entry.machine.ipmi == IpmiAccess(host="10.49.16.17", credential="ipmi-10.49.16.17")


def test_worker_config_without_community():
    data = copy.deepcopy(WORKER_CONFIG)
    del data["snmp_community_string"]
    plan = plan_import(data, {}, "legacy")
    entry = by_key(plan)["t-rack-01"]
    assert entry.machine.pdu.credential is None
    assert "no snmp_community_string" in entry.reason
    assert "snmp-legacy" not in plan.credentials


@pytest.mark.parametrize("server, reason", [
    ({"pdu": "pdu1.example.com"}, "pdu: must be 'host:outlet' (e.g. 'pdu1.example.com:AA8'), got 'pdu1.example.com'"),
    ({"pdu": 12}, "pdu: must be 'host:outlet' (e.g. 'pdu1.example.com:AA8'), got an integer"),
    ({"pdu": "pdu1.example.com:ZZZ9"}, "pdu.outlet: outlet 'ZZZ9' is not valid"),
    ({"ssh": "cltbld"}, "ssh: must be an object, got a string"),
    ({"ssh": {"user": "cltbld", "key_file": 5}}, "ssh.key_file: must be a string, got an integer"),
    ({"ssh": {"user": "clt bld"}}, "ssh.user: user name 'clt bld' is not valid"),
    ({"bug_cc": "not-an-address"}, "bug_cc[0]: e-mail address 'not-an-address' is not valid"),
    ({"xen": "uuid"}, "xen: must be an object, got a string"),
    ({"ipmi": {"ip": "10.49.16.17", "addr": "c7n1"}},
     "ipmi.addr: unknown cartridge address 'c7n1' for IPMI type 'moonshot' (known: c1n1, c2n1, c3n1)"),
    ([], "entry must be an object, got a list"),
])
def test_worker_config_rejected(server, reason):
    data = copy.deepcopy(WORKER_CONFIG)
    data["servers"]["t-bad-01"] = server
    plan = plan_import(data, {}, "legacy")
    entry = by_key(plan)["t-bad-01"]
    assert (entry.action, entry.reason, entry.machine) == ("rejected", reason, None)
    assert plan.counts()["imported"] == 3
    assert_no_secrets(plan)


def test_worker_config_secret_echoed_by_validation_is_redacted():
    data = copy.deepcopy(WORKER_CONFIG)
    data["servers"]["t-bad-01"] = {"ssh": {"user": f"{COMMUNITY} x"}}
    plan = plan_import(data, {}, "legacy")
    entry = by_key(plan)["t-bad-01"]
    assert entry.action == "rejected"
    assert entry.reason == "ssh.user: user name '*** x' is not valid"
    assert_no_secrets(plan)


def test_worker_config_ip_key_gets_dashed_worker_id():
    data = {"servers": {"10.49.58.3": {"ssh": {"user": "cltbld"}}}}
    (entry,) = plan_import(data, {}, "legacy").entries
    assert entry.machine.worker_id == "10-49-58-3"
    assert entry.machine.ip == "10.49.58.3"


def test_worker_config_conflicting_credentials():
    data = {"servers": {
        "w1": {"ssh": {"user": "a", "key_file": "/keys/a/id_ed25519"}},
        "w2": {"ssh": {"user": "a", "key_file": "/keys/b/id_ed25519"}},
        "w3": {"ip": "10.0.0.1", "ipmi": {"user": "u", "password": IPMI_PASSWORD, "ip": "10.0.0.100"}},
        "w4": {"ip": "10.0.0.2", "ipmi": {"user": "u", "password": "Other-pw-123", "ip": "10.0.0.100"}},
    }}
    plan = plan_import(data, {}, "legacy")
    entries = by_key(plan)
    assert entries["w2"].reason == "credential ssh-id_ed25519 is already defined differently by entry 'w1'"
    assert entries["w4"].reason == "credential ipmi-10.0.0.100 is already defined differently by entry 'w3'"
    assert plan.credentials["ssh-id_ed25519"].path == "/keys/a/id_ed25519"
    assert plan.credentials["ipmi-10.0.0.100"].password == IPMI_PASSWORD
    assert_no_secrets(plan, SECRETS + ("Other-pw-123",))


def test_worker_config_format_errors():
    with pytest.raises(ImportFormatError) as info:
        plan_import({"servers": []}, {}, "legacy")
    assert "'servers' must be an object, got a list" in info.value.message
    with pytest.raises(ImportFormatError) as info:
        plan_import({"servers": {}, "snmp_community_string": 5}, {}, "legacy")
    assert "'snmp_community_string' must be a string" in info.value.message


def test_worker_config_notes():
    data = copy.deepcopy(WORKER_CONFIG)
    data["bugzilla_api_key_file"] = "/x"
    plan = plan_import(data, {}, "legacy")
    assert "ignored top-level key(s): bugzilla_api_key_file" in plan.notes
    assert any("'commands'" in n for n in plan.notes)


def test_bad_group_and_format():
    with pytest.raises(ValidationError):
        plan_import(SEED_XEN, {}, "bad group")
    with pytest.raises(ImportFormatError):
        plan_import(SEED_XEN, {}, "legacy", format="csv")
    with pytest.raises(ImportFormatError):
        plan_import([], {}, "legacy", format="xen")


# -- merging into the existing inventory


def existing_xen() -> Machine:
    return Machine.from_json({
        "worker_id": "t-linux-xen-01",
        "worker_group": "legacy",
        "ip": "10.49.40.5",
        "ssh": {"user": "root", "port": 2222},
        "xen": {"vm_uuid": "old-uuid", "url": "https://xenpool.example.com", "credential": "xen-pool"},
        "bug_cc": ["ops@example.com"],
        "notes": "keep me",
    })


def test_merge_updates_existing_by_worker_id():
    current = existing_xen()
    plan = plan_import(WORKER_CONFIG, existing_of(current), "legacy")
    entry = by_key(plan)["t-linux-xen-01"]
    assert entry.action == "updated"
    assert entry.reason == "merged into existing legacy/t-linux-xen-01: changed ssh, xen"
    m = entry.machine
    assert m.ssh == SshAccess(user="root", port=2222, credential="ssh-win_worker")
    assert m.xen == XenAccess(vm_uuid="0b1c2d3e-aaaa-bbbb-cccc-0123456789ab",
                              url="https://xenpool.example.com", credential="xen-pool")
    assert m.notes == "keep me" and m.bug_cc == ("ops@example.com",)
    assert plan.counts()["updated"] == 1

    # importing again into the updated inventory changes nothing
    again = plan_import(WORKER_CONFIG, existing_of(m), "legacy")
    entry = by_key(again)["t-linux-xen-01"]
    assert entry.action == "unchanged"
    assert entry.reason == "existing legacy/t-linux-xen-01 already has these settings"
    assert entry.machine == m
    assert entry not in again.machines() and m not in again.machines()
    assert "ssh-win_worker" in again.credentials


def test_merge_by_ip_in_other_group_and_bug_cc():
    current = Machine.from_json({"worker_id": "ms-001", "worker_group": "mdc1", "ip": "10.49.58.3",
                                 "bug_cc": ["ci@example.com"]})
    data = {"servers": {"t-w1064-ms-001": {"ip": "10.49.58.3", "bug_cc": "relops@example.com, ci@example.com",
                                           "fqdn": "ms-001.example.com"}}}
    (entry,) = plan_import(data, existing_of(current), "legacy").entries
    assert entry.action == "updated"
    assert entry.reason == "merged into existing mdc1/ms-001 (matched by ip 10.49.58.3): changed bug_cc, fqdn"
    assert entry.machine.key == ("mdc1", "ms-001")
    assert entry.machine.bug_cc == ("ci@example.com", "relops@example.com")
    assert entry.machine.fqdn == "ms-001.example.com"


def test_merge_by_fqdn_keeps_existing_ip():
    current = Machine.from_json({"worker_id": "other-name", "worker_group": "legacy", "ip": "10.0.0.9",
                                 "fqdn": "test_tc_worker_id.test.releng.dne-dc-1.mozilla.com"})
    data = {"test_tc_worker_id.test.releng.dne-dc-1.mozilla.com": {"xen_uuid": "test_xen_vm_uuid"}}
    (entry,) = plan_import(data, existing_of(current), "legacy").entries
    assert entry.action == "updated"
    assert entry.machine.key == ("legacy", "other-name")
    assert entry.machine.xen == XenAccess(vm_uuid="test_xen_vm_uuid")
    assert "matched by fqdn" in entry.reason


def test_merge_keeps_existing_address_and_says_so():
    current = Machine.from_json({"worker_id": "w1", "worker_group": "legacy", "ip": "10.0.0.1"})
    data = {"servers": {"w1": {"ip": "10.0.0.2", "ssh": {"user": "cltbld"}}}}
    (entry,) = plan_import(data, existing_of(current), "legacy").entries
    assert entry.action == "updated"
    assert entry.machine.ip == "10.0.0.1"
    assert entry.reason == ("merged into existing legacy/w1: changed ssh; "
                            "kept the existing ip 10.0.0.1 (the file has 10.0.0.2)")


def test_merge_cartridge_unchanged():
    first = plan_import(SEED_IPMI, {}, "legacy")
    machine = by_key(first)["10.49.58.3"].machine
    second = plan_import(SEED_IPMI, existing_of(machine), "legacy")
    assert by_key(second)["10.49.58.3"].action == "unchanged"
    assert by_key(second)["10.49.16.17"].action == "skipped"
    assert second.machines() == ()


def test_merge_ambiguous_match_rejected():
    a = Machine.from_json({"worker_id": "a", "worker_group": "g1", "ip": "10.0.0.1"})
    b = Machine.from_json({"worker_id": "b", "worker_group": "g2", "fqdn": "w1.example.com"})
    data = {"servers": {"w1": {"ip": "10.0.0.1", "fqdn": "w1.example.com"}}}
    (entry,) = plan_import(data, existing_of(a, b), "legacy").entries
    assert entry.action == "rejected"
    assert entry.reason == "matches several existing machines by ip/fqdn: g1/a, g2/b; import it by hand"


def test_duplicate_worker_id_in_file_rejected():
    data = {"w1.a.example.com": {"xen_uuid": "u1"}, "w1.b.example.com": {"xen_uuid": "u2"}}
    plan = plan_import(data, {}, "legacy")
    first, second = plan.entries
    assert first.action == "imported"
    assert second.action == "rejected"
    assert second.reason == "machine legacy/w1 is already planned from entry 'w1.a.example.com'"


def test_import_entry_validates_action():
    with pytest.raises(ValueError):
        ImportEntry(source_key="x", action="deleted", reason="")
