"""
Inventory admin pages (roller/web/admin.py) under /admin of the composed
site: add, edit, delete a machine through forms, invalid input shown next
to the form, CSRF, and importing legacy files by upload.

Same harness as tests/test_dashboard.py (its L{make_env}: a real SQLite
store answering synchronously, treq's C{RequestTraversalAgent}), with the
admin app mounted by L{root_resource}.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer

from roller.auth import AnonymousAuthenticator
from roller.secrets import load_secrets
from roller.testing.syncdb import result_of
from roller.web.admin import InventoryAdmin, form_to_json, machine_to_form
from roller.web.api import Api
from roller.web.dashboard import Viewer
from roller.web.site import root_resource
from test_dashboard import Env, NoCookies, csrf_of, make_env
from test_legacy_import import IPMI_PASSWORD, SEED_IPMI, SEED_XEN, WORKER_CONFIG


def admin_env(tmp_path: Path, **admin_kw: Any) -> Env:
    e = make_env(tmp_path)
    e.clock.advance(1_700_000_000)
    api = Api(e.store, e.queue, e.dashboard.tasks, AnonymousAuthenticator(), allowed_tasks=("reboot", "ping"),
              clock=e.clock)
    admin = InventoryAdmin(e.dashboard, e.store, **admin_kw)
    e.agent = RequestTraversalAgent(root_resource(api, e.dashboard, e.hub, admin=admin))
    e.client = HTTPClient(e.agent, cookiejar=NoCookies(), data_to_body_producer=_SynchronousProducer)
    e.add_machine("m1", "g1", ip="192.0.2.1", pool="mac", ssh={"user": "builder", "credential": "mac-ssh-key"})
    return e


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return admin_env(tmp_path, secrets_file=str(tmp_path / "secrets.toml"))


def machine(env: Env, group: str, wid: str) -> Any:
    return result_of(env.store.machines.get(group, wid))


def field_error(html: str, name: str) -> str | None:
    """The error shown under form field C{name}, if any."""
    m = re.search(r'name="' + re.escape(name) + r'"[^>]*aria-invalid="true"[^>]*>\s*<p class="field-error">([^<]*)<',
                  html)
    return m and m.group(1)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, content) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                   f"Content-Type: application/json\r\n\r\n".encode() + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def upload(env: Env, data: Any, *, filename: str = "inv.json", group: str = "legacy", dry_run: bool = False,
           token: str | None = None) -> Any:
    if token is None:
        token = csrf_of(env.get("/admin/import").text)
    fields = {"csrf_token": token, "group": group}
    if dry_run:
        fields["dry_run"] = "yes"
    body, ctype = multipart(fields, {"file": (filename, json.dumps(data).encode())})
    return env.post("/admin/import", body=body, headers={"Content-Type": ctype})


# -- form <-> machine JSON


def test_form_round_trips_a_machine(env: Env) -> None:
    m = machine(env, "g1", "m1").replace(tags=("a", "b"), bug_cc=("x@example.com",))
    form = machine_to_form(m)
    assert form["ssh.credential"] == "mac-ssh-key" and form["tags"] == "a b"
    from roller.inventory import Machine
    assert Machine.from_json(form_to_json(form)) == m
    assert form_to_json({"worker_id": "w", "worker_group": "g", "ipmi.port": "623", "ipmi.host": "",
                         "liveness.method": "icmp", "bug_cc": "a@x.org, b@x.org"}) == {
        "worker_id": "w", "worker_group": "g", "ipmi": {"port": 623}, "bug_cc": ["a@x.org", "b@x.org"]}


# -- add, edit, delete


def test_fleet_and_machine_pages_link_to_the_admin_pages(env: Env) -> None:
    fleet = env.get("/").text
    assert 'href="/admin/machines/new"' in fleet and 'href="/admin/import"' in fleet
    page = env.get("/machines/g1/m1").text
    assert 'href="/admin/machines/g1/m1/edit"' in page and 'href="/admin/machines/g1/m1/delete"' in page
    assert env.get("/admin").code == 200


def test_add_a_machine_through_the_form(env: Env) -> None:
    page = env.get("/admin/machines/new")
    assert page.code == 200
    assert '<label for="f-worker_id">' in page.text and 'id="f-worker_id"' in page.text  # labelled fields
    form = {"csrf_token": csrf_of(page.text), "worker_group": "g9", "worker_id": "new-1", "ip": "192.0.2.50",
            "pool": "linux", "ipmi.host": "192.0.2.150", "ipmi.credential": "bmc", "ipmi.port": "6230",
            "liveness.method": "icmp", "redfish.verify_tls": "yes"}
    r = env.post("/admin/machines", form=form)
    assert r.code == 303 and r.header("location") == "/machines/g9/new-1?saved=1"
    m = machine(env, "g9", "new-1")
    assert m.ip == "192.0.2.50" and m.ipmi.port == 6230 and m.ipmi.credential == "bmc" and m.redfish is None
    entry = env.audit()[0]
    assert (entry.action, entry.target, entry.actor, entry.result) == ("machine.create", "g9/new-1",
                                                                        "dashboard:local", "created")
    assert entry.params["via"] == "dashboard" and entry.params["ip"] == "192.0.2.50"
    assert rows_of(env.get("/?group=g9").text) == ["new-1"]
    # the same again is a conflict, shown in the form
    r = env.post("/admin/machines", form={**form, "csrf_token": csrf_of(env.get("/admin/machines/new").text)})
    assert r.code == 400 and "Not saved." in r.text and "already" in r.text.lower()


def rows_of(html: str) -> list[str]:
    return re.findall(r'<th scope="row"><a href="/machines/[^"]+">([^<]+)</a>', html)


def test_invalid_input_is_shown_next_to_the_field_and_nothing_is_saved(env: Env) -> None:
    token = csrf_of(env.get("/admin/machines/new").text)
    bad = {"csrf_token": token, "worker_group": "g1", "worker_id": "w2", "ip": "not an ip",
           "notes": "kept <b>as typed</b>"}
    r = env.post("/admin/machines", form=bad)
    assert r.code == 400
    assert field_error(r.text, "ip"), r.text
    assert 'value="not an ip"' in r.text  # what the user typed is kept
    assert "kept &lt;b&gt;as typed&lt;/b&gt;" in r.text  # and escaped
    r = env.post("/admin/machines", form={**bad, "ip": "192.0.2.9", "ipmi.port": "99999", "ipmi.host": "bmc.example"})
    assert r.code == 400 and field_error(r.text, "ipmi.port")
    r = env.post("/admin/machines", form={**bad, "ip": "", "worker_id": "bad id!"})
    assert r.code == 400 and field_error(r.text, "worker_id")
    assert machine(env, "g1", "w2") is None and env.audit() == []


def test_edit_a_machine(env: Env) -> None:
    page = env.get("/admin/machines/g1/m1/edit")
    assert page.code == 200 and 'value="192.0.2.1"' in page.text and 'value="mac-ssh-key"' in page.text
    form = {"csrf_token": csrf_of(page.text), **machine_to_form(machine(env, "g1", "m1"))}
    form.update({"pool": "linux", "ssh.port": "2222", "worker_id": "ignored"})  # the URL names the machine
    r = env.post("/admin/machines/g1/m1", form=form)
    assert r.code == 303 and r.header("location") == "/machines/g1/m1?saved=1"
    m = machine(env, "g1", "m1")
    assert m.pool == "linux" and m.ssh.port == 2222 and m.ssh.credential == "mac-ssh-key"
    entry = env.audit()[0]
    assert (entry.action, entry.target, entry.result) == ("machine.put", "g1/m1", "updated")
    r = env.post("/admin/machines/g1/m1", form={**form, "ssh.port": "x"})
    assert r.code == 400 and field_error(r.text, "ssh.port") and machine(env, "g1", "m1").ssh.port == 2222
    assert env.get("/admin/machines/g1/nope/edit").code == 404


def test_delete_a_machine(env: Env) -> None:
    page = env.get("/admin/machines/g1/m1/delete")
    assert page.code == 200 and "Yes, delete m1" in page.text
    r = env.post("/admin/machines/g1/m1/delete", form={"csrf_token": csrf_of(page.text)})
    assert r.code == 303 and r.header("location") == "/admin?deleted=g1%2Fm1"
    assert machine(env, "g1", "m1") is None
    assert "Deleted g1/m1" in env.get("/admin?deleted=g1%2Fm1").text
    entry = env.audit()[0]
    assert (entry.action, entry.target, entry.result) == ("machine.delete", "g1/m1", "deleted")
    r = env.post("/admin/machines/g1/m1/delete", form={"csrf_token": csrf_of(page.text)})
    assert r.code == 404


def test_every_post_needs_the_csrf_token(env: Env) -> None:
    env.get("/admin/machines/new")  # the cookie
    form = {"worker_group": "g1", "worker_id": "sneaky"}
    for path, data in (("/admin/machines", form), ("/admin/machines/g1/m1", {"pool": "x"}),
                       ("/admin/machines/g1/m1/delete", {})):
        r = env.post(path, form=data)
        assert r.code == 403 and "security token" in r.text and "Nothing was done" in r.text, path
        r = env.post(path, form={**data, "csrf_token": "v1.1700000000.forged"})
        assert r.code == 403, path
    body, ctype = multipart({"group": "legacy"}, {"file": ("xen.json", json.dumps(SEED_XEN).encode())})
    assert env.post("/admin/import", body=body, headers={"Content-Type": ctype}).code == 403
    assert machine(env, "g1", "sneaky") is None and machine(env, "g1", "m1").pool == "mac"
    assert env.audit() == [] and result_of(env.store.machines.count()) == 1


def test_a_viewer_without_the_inventory_scope_may_not_write(tmp_path: Path) -> None:
    from twisted.internet.defer import succeed

    class ReadOnly:
        def viewer(self, request: Any) -> Any:
            return succeed(Viewer(id="user:ro", name="ro", scopes=("project:releng:roller:ping",)))

    e = admin_env(tmp_path)
    e.dashboard.auth = ReadOnly()
    assert e.get("/admin/machines/new").code == 403
    token = csrf_of(e.get("/machines/g1/m1").text)
    r = e.post("/admin/machines/g1/m1/delete", form={"csrf_token": token})
    assert r.code == 403 and "inventory:write" in r.text and machine(e, "g1", "m1") is not None


# -- import by upload


@pytest.mark.parametrize("name,data,expect", [
    ("ipmi.json", SEED_IPMI, {"10.49.16.17": "skipped", "10.49.58.3": "imported"}),  # a chassis BMC: skipped
    ("xen.json", SEED_XEN, {"test_tc_worker_id.test.releng.dne-dc-1.mozilla.com": "imported"}),
    ("worker_config.json", WORKER_CONFIG, {"t-w1064-ms-001": "imported", "moon-chassis-1": "skipped",
                                           "t-rack-01": "imported"}),
])
def test_upload_each_legacy_shape_shows_its_report(env: Env, tmp_path: Path, name: str, data: Any,
                                                   expect: dict) -> None:
    page = env.get("/admin/import")
    assert page.code == 200 and 'enctype="multipart/form-data"' in page.text and '<label for="file">' in page.text
    dry = upload(env, data, filename=name, dry_run=True)
    assert dry.code == 200 and "Nothing was changed (dry run)" in dry.text
    assert result_of(env.store.machines.count()) == 1 and env.audit() == []
    r = upload(env, data, filename=name)
    assert r.code == 200, r.text
    for key, action in expect.items():
        row = re.search(r"<tr class=\"import-(\w+)\">\s*<th scope=\"row\">" + re.escape(key) + "<", r.text)
        assert row and row.group(1) == action, key
    assert f"Imported {name}" in r.text
    assert IPMI_PASSWORD not in r.text and "password" not in r.text.split("<main", 1)[1].lower().replace(
        "password)", "")  # never a secret
    assert result_of(env.store.machines.count()) > 1
    entry = env.audit()[0]
    assert entry.action == "machines.import" and entry.params["file"] == name
    assert entry.params["via"] == "dashboard" and entry.params["group"] == "legacy"
    assert IPMI_PASSWORD not in json.dumps(entry.params)
    secrets = load_secrets(tmp_path / "secrets.toml")
    if name != "xen.json":
        assert secrets.names()  # credentials merged into the secrets file, as `roller import` does
    again = upload(env, data, filename=name)
    assert "unchanged" in again.text


def test_upload_problems_are_shown_in_plain_words(env: Env) -> None:
    token = csrf_of(env.get("/admin/import").text)
    body, ctype = multipart({"csrf_token": token, "group": "legacy"}, {"file": ("x.json", b"{not json")})
    r = env.post("/admin/import", body=body, headers={"Content-Type": ctype})
    assert r.code == 400 and "x.json is not valid JSON" in r.text
    r = upload(env, [1, 2], token=token)
    assert r.code == 400 and "got a list" in r.text
    r = upload(env, SEED_XEN, group="bad group!", token=token)
    assert r.code == 400 and "worker group" in r.text
    body, ctype = multipart({"csrf_token": token, "group": "legacy"}, {})
    r = env.post("/admin/import", body=body, headers={"Content-Type": ctype})
    assert r.code == 400 and "Choose a legacy inventory file" in r.text
    assert env.audit() == []


def test_import_with_credentials_needs_a_secrets_file(tmp_path: Path) -> None:
    e = admin_env(tmp_path)  # no secrets file
    r = upload(e, SEED_IPMI)
    assert r.code == 400 and "no secrets file" in r.text and result_of(e.store.machines.count()) == 1
    assert upload(e, SEED_XEN).code == 200  # no credentials: fine
