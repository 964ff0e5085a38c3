"""Run credentials: files, permissions, ids derived from keys, certificates signed by the run CA."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509

from peer.credentials import (
    CA_KEY, MEMBER_NAME, NODE_KEY, create_run_credentials, ephemeral_identity, load_run_ca, member_name,
    node_identity, peer_id_of_certificate, verify_signed_by,
)
from peer.errors import ConfigError


def test_new_credentials_are_private_and_name_their_run(tmp_path):
    out = create_run_credentials("lab1", tmp_path / "c")
    assert stat.S_IMODE(os.stat(out / CA_KEY).st_mode) == 0o600
    assert load_run_ca(out).run_id == "lab1"
    with pytest.raises(ConfigError, match="not 'lab2'"):
        load_run_ca(out, "lab2")
    with pytest.raises(ConfigError, match="already holds"):
        create_run_credentials("lab1", out)


def test_a_readable_key_is_refused_with_the_fix(tmp_path):
    out = create_run_credentials("lab1", tmp_path / "c")
    os.chmod(out / CA_KEY, 0o640)
    with pytest.raises(ConfigError, match=rf"chmod 600 {out / CA_KEY}"):
        load_run_ca(out)


def test_missing_or_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="peer keys new"):
        load_run_ca(tmp_path / "nothing")
    a = create_run_credentials("r", tmp_path / "a")
    b = create_run_credentials("r", tmp_path / "b")
    (a / CA_KEY).write_bytes((b / CA_KEY).read_bytes())
    with pytest.raises(ConfigError, match="does not belong"):
        load_run_ca(a)


def test_a_peer_id_is_derived_from_its_key_and_kept(tmp_path):
    ca = load_run_ca(create_run_credentials("r", tmp_path / "c"))
    first = node_identity(ca, tmp_path / "state")
    again = node_identity(ca, tmp_path / "state")
    assert first.peer_id == again.peer_id == peer_id_of_certificate(first.cert_pem)
    assert len(first.peer_id) == 16 and int(first.peer_id, 16) >= 0
    assert stat.S_IMODE(os.stat(tmp_path / "state" / NODE_KEY).st_mode) == 0o600
    other = node_identity(ca, tmp_path / "state2")
    assert other.peer_id != first.peer_id
    # the certificate is the run CA's and names both the member and this peer
    assert verify_signed_by(first.cert_pem, ca)
    cert = x509.load_pem_x509_certificate(first.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert set(names) == {MEMBER_NAME, member_name(first.peer_id)}


def test_another_runs_ca_does_not_sign_our_members(tmp_path):
    ours = load_run_ca(create_run_credentials("r", tmp_path / "ours"))
    theirs = load_run_ca(create_run_credentials("r", tmp_path / "theirs"))
    assert not verify_signed_by(ephemeral_identity(theirs).cert_pem, ours)
    assert verify_signed_by(ephemeral_identity(ours).cert_pem, ours)
