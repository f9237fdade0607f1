"""DICOM audit messages (PS3.15 A.5) and their RFC 5424 syslog delivery, against real sockets.

No RELAX NG / XSD validator is installed here (no xmllint, no lxml), so `assert_schema_valid`
checks the DICOM Audit Message Schema of PS3.15 A.5.1 by hand: element order and cardinality,
required attributes and the schema's enumerations. The per-event tables (A.5.3.4 Export,
A.5.3.5 Import, A.5.3.7 DICOM Instances Transferred) are checked by `assert_*_table`.
"""
from __future__ import annotations

import re
import socket
import threading
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestration.audit import (AuditStudy, export_message, import_message, instances_transferred_message,
                                 outcome_code, send_syslog, syslog_frame)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
STUDY_A = "1.2.826.0.1.3680043.8.498.1001"
STUDY_B = "1.2.826.0.1.3680043.8.498.1002"
STUDY_C = "1.2.826.0.1.3680043.8.498.1003"
WHEN = datetime(2025, 3, 4, 10, 20, 30, 456000, tzinfo=timezone(timedelta(hours=1)))


def one_patient_studies() -> list[AuditStudy]:
    return [
        AuditStudy(STUDY_A, {CT: 210, SR: 1}, patient_id="DF-1", patient_name="DOE^JANE"),
        AuditStudy(STUDY_B, {MR: 48}, patient_id="DF-1", patient_name="DOE^JANE"),
    ]


def two_patient_studies() -> list[AuditStudy]:
    return one_patient_studies() + [AuditStudy(STUDY_C, {CT: 3}, patient_id="DF-2", patient_name="ROE^RICHARD")]


def export_xml(media: str = "dvd", outcome: int = 0, studies: list[AuditStudy] | None = None) -> str:
    return export_message(one_patient_studies() if studies is None else studies, outcome=outcome, media=media,
                          user="frontdesk@radiology.example.org", source_id="discflow-ws1",
                          destination="DISCFLOW_20250304_1", when=WHEN)


def import_xml(media: str = "cd", outcome: int = 0) -> str:
    return import_message(two_patient_studies(), outcome=outcome, media=media, user="clerk@radiology.example.org",
                          source_id="discflow-ws1", source_media_label="ST_ELSEWHERE_CT", when=WHEN)


def transferred_xml(action: str = "R", outcome: int = 0) -> str:
    return instances_transferred_message(one_patient_studies(), outcome=outcome, action=action,
                                         source_ae="DISCFLOW", destination_ae="ORTHANC",
                                         destination_host="127.0.0.1", user="clerk@radiology.example.org",
                                         source_id="discflow-ws1", when=WHEN)


# --------------------------------------------------------------------------------------------------
# The A.5.1 schema, by hand

CODED = ({"csd-code", "codeSystemName", "originalText"}, {"displayName"})
SCHEMA_ATTRIBUTES: dict[str, tuple[set[str], set[str]]] = {
    "AuditMessage": (set(), set()),
    "EventIdentification": ({"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"}),
    "EventID": CODED, "EventTypeCode": CODED, "RoleIDCode": CODED, "MediaType": CODED,
    "ParticipantObjectIDTypeCode": CODED,
    "ActiveParticipant": ({"UserID", "UserIsRequestor"},
                          {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"}),
    "MediaIdentifier": (set(), set()),
    "AuditSourceIdentification": ({"AuditSourceID"}, {"AuditEnterpriseSiteID"}),
    "AuditSourceTypeCode": ({"csd-code"}, {"codeSystemName", "displayName", "originalText"}),
    "ParticipantObjectIdentification": ({"ParticipantObjectID"},
                                        {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
                                         "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"}),
    "ParticipantObjectName": (set(), set()),
    "ParticipantObjectDescription": (set(), set()),
    "SOPClass": ({"NumberOfInstances"}, {"UID"}),
}
# Children in schema order: (tag, min, max).
SCHEMA_CHILDREN: dict[str, list[tuple[str, int, float]]] = {
    "AuditMessage": [("EventIdentification", 1, 1), ("ActiveParticipant", 1, float("inf")),
                     ("AuditSourceIdentification", 1, 1), ("ParticipantObjectIdentification", 0, float("inf"))],
    "EventIdentification": [("EventID", 1, 1), ("EventTypeCode", 0, float("inf")),
                            ("EventOutcomeDescription", 0, 1)],
    "ActiveParticipant": [("RoleIDCode", 0, float("inf")), ("MediaIdentifier", 0, 1)],
    "MediaIdentifier": [("MediaType", 1, 1)],
    "AuditSourceIdentification": [("AuditSourceTypeCode", 0, float("inf"))],
    # The schema's Name|Query choice is left optional, as every message table marks both U.
    "ParticipantObjectIdentification": [("ParticipantObjectIDTypeCode", 1, 1), ("ParticipantObjectName", 0, 1),
                                        ("ParticipantObjectDetail", 0, float("inf")),
                                        ("ParticipantObjectDescription", 0, float("inf"))],
    "ParticipantObjectDescription": [("MPPS", 0, float("inf")), ("Accession", 0, float("inf")),
                                     ("SOPClass", 0, float("inf")), ("ParticipantObjectContainsStudy", 0, 1),
                                     ("Encrypted", 0, 1), ("Anonymized", 0, 1)],
}
SCHEMA_ENUMERATIONS = {
    ("EventIdentification", "EventActionCode"): {"C", "R", "U", "D", "E"},
    ("EventIdentification", "EventOutcomeIndicator"): {"0", "4", "8", "12"},
    ("ActiveParticipant", "UserIsRequestor"): {"true", "false"},
    ("ActiveParticipant", "NetworkAccessPointTypeCode"): {"1", "2", "3", "4", "5"},
    ("ParticipantObjectIdentification", "ParticipantObjectTypeCode"): {"1", "2", "3", "4"},
    ("ParticipantObjectIdentification", "ParticipantObjectTypeCodeRole"): {str(n) for n in range(1, 27)},
}
XSD_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def assert_schema_valid(element: ET.Element) -> None:
    required, optional = SCHEMA_ATTRIBUTES[element.tag]
    assert required <= set(element.attrib), f"{element.tag} lacks {required - set(element.attrib)}"
    assert set(element.attrib) <= required | optional, f"{element.tag} has unknown {set(element.attrib) - required - optional}"
    for (tag, name), allowed in SCHEMA_ENUMERATIONS.items():
        if element.tag == tag and name in element.attrib:
            assert element.attrib[name] in allowed, f"{tag}/@{name}={element.attrib[name]!r}"
    if element.tag == "EventIdentification":
        assert XSD_DATETIME.match(element.attrib["EventDateTime"])
    if element.tag == "SOPClass":
        assert element.attrib["NumberOfInstances"].isdigit()
    assert_children_in_order(element)
    for child in element:
        assert_schema_valid(child)


def assert_children_in_order(element: ET.Element) -> None:
    tags = [child.tag for child in element]
    position = 0
    for tag, low, high in SCHEMA_CHILDREN.get(element.tag, []):
        count = 0
        while position < len(tags) and tags[position] == tag:
            count, position = count + 1, position + 1
        assert low <= count <= high, f"{element.tag}: {count} x {tag}, schema allows {low}..{high}"
    assert position == len(tags), f"{element.tag}: unexpected or misplaced {tags[position:]}"


# --------------------------------------------------------------------------------------------------
# The per-event tables


def coded(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def participants_with_role(root: ET.Element, code: str) -> list[ET.Element]:
    return [p for p in root.findall("ActiveParticipant") if any(r.get("csd-code") == code for r in p.findall("RoleIDCode"))]


def study_objects(root: ET.Element) -> list[ET.Element]:
    return [o for o in root.findall("ParticipantObjectIdentification")
            if (o.get("ParticipantObjectTypeCode"), o.get("ParticipantObjectTypeCodeRole")) == ("2", "3")]


def patient_objects(root: ET.Element) -> list[ET.Element]:
    return [o for o in root.findall("ParticipantObjectIdentification")
            if (o.get("ParticipantObjectTypeCode"), o.get("ParticipantObjectTypeCodeRole")) == ("1", "1")]


def sop_counts(study: ET.Element) -> dict[str, int]:
    return {s.get("UID"): int(s.get("NumberOfInstances")) for s in study.findall("ParticipantObjectDescription/SOPClass")}


def assert_event(root: ET.Element, code: tuple[str, str, str], action: str, outcome: str) -> None:
    event = root.find("EventIdentification")
    assert coded(event.find("EventID")) == code
    assert event.get("EventActionCode") == action
    assert event.get("EventOutcomeIndicator") == outcome
    assert event.get("EventDateTime") == "2025-03-04T09:20:30.456Z"   # WHEN, in UTC


def assert_objects(root: ET.Element, studies: list[AuditStudy]) -> None:
    """Studies: type 2 role 3, EV (110180, DCM, "Study Instance UID"), SOP classes. Patients: 1/1, EV 2."""
    found = {o.get("ParticipantObjectID"): o for o in study_objects(root)}
    assert set(found) == {s.study_instance_uid for s in studies}
    for study in studies:
        element = found[study.study_instance_uid]
        assert coded(element.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
        assert sop_counts(element) == study.sop_classes
    patients = {o.get("ParticipantObjectID"): o for o in patient_objects(root)}
    assert sorted(patients) == sorted({s.patient_id for s in studies})
    for study in studies:
        patient = patients[study.patient_id]
        assert coded(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
        assert patient.findtext("ParticipantObjectName") == study.patient_name
    assert len(root.findall("ParticipantObjectIdentification")) == len(found) + len(patients)


def assert_audit_source(root: ET.Element) -> None:
    sources = root.findall("AuditSourceIdentification")
    assert len(sources) == 1 and sources[0].get("AuditSourceID") == "discflow-ws1"


def assert_single_requestor(root: ET.Element, user: str) -> None:
    """A.5.3.4.1 / A.5.3.5: exactly one participant is the requestor - the person."""
    requestors = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert [p.get("UserID") for p in requestors] == [user]


def assert_media(participant: ET.Element, role: tuple[str, str, str], media_code: tuple[str, str, str],
                 user_id: str) -> None:
    assert participant.get("UserID") == user_id
    assert participant.get("UserIsRequestor") == "false"
    assert coded(participant.find("RoleIDCode")) == role
    assert coded(participant.find("MediaIdentifier/MediaType")) == media_code


def assert_export_table(root: ET.Element) -> None:
    """Table A.5.3.4-1: exporting user and/or process (1..2, 110153), the media (1, 110154), patients 1..N."""
    assert_event(root, ("110106", "DCM", "Export"), "R", root.find("EventIdentification").get("EventOutcomeIndicator"))
    exporters = participants_with_role(root, "110153")
    assert 1 <= len(exporters) <= 2
    assert {p.get("UserID") for p in exporters} == {"frontdesk@radiology.example.org", "discflow"}
    media = participants_with_role(root, "110154")
    assert len(media) == 1
    assert_single_requestor(root, "frontdesk@radiology.example.org")
    assert_audit_source(root)
    assert patient_objects(root), "Patients (1..N) is mandatory"


def assert_import_table(root: ET.Element) -> None:
    """Table A.5.3.5-1: importing user/process (1..N, 110152), source media (1, 110155) with media type."""
    assert_event(root, ("110107", "DCM", "Import"), "C", root.find("EventIdentification").get("EventOutcomeIndicator"))
    importers = participants_with_role(root, "110152")
    assert {p.get("UserID") for p in importers} == {"clerk@radiology.example.org", "discflow"}
    media = participants_with_role(root, "110155")
    assert len(media) == 1 and media[0].find("MediaIdentifier/MediaType") is not None
    assert_single_requestor(root, "clerk@radiology.example.org")
    assert_audit_source(root)
    assert patient_objects(root)


def assert_transferred_table(root: ET.Element) -> None:
    """Table A.5.3.7-1: sender (1, 110153), receiver (1, 110152), studies 1..N, exactly one patient."""
    senders, receivers = participants_with_role(root, "110153"), participants_with_role(root, "110152")
    assert [p.get("UserID") for p in senders] == ["DISCFLOW"]
    assert [p.get("UserID") for p in receivers] == ["ORTHANC"]
    assert senders[0].get("AlternativeUserID") == "AETITLES=DISCFLOW"        # A.5.2.2
    assert receivers[0].get("AlternativeUserID") == "AETITLES=ORTHANC"
    assert receivers[0].get("NetworkAccessPointID") == "127.0.0.1"
    assert receivers[0].get("NetworkAccessPointTypeCode") == "2"            # an IP address
    assert_single_requestor(root, "clerk@radiology.example.org")
    assert_audit_source(root)
    assert len(study_objects(root)) >= 1 and len(patient_objects(root)) == 1


# --------------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize("media, code", [
    ("cd", ("110032", "DCM", "CD")),
    ("dvd", ("110033", "DCM", "DVD")),
    ("dvd-dl", ("110033", "DCM", "DVD")),
    ("usb", ("110030", "DCM", "USB Disk Emulation")),
    ("bd", ("BD", "99DISCFLOW", "Blu-ray Disc")),
])
def test_export_message(media: str, code: tuple[str, str, str]) -> None:
    root = ET.fromstring(export_xml(media))
    assert_schema_valid(root)
    assert_export_table(root)
    assert_event(root, ("110106", "DCM", "Export"), "R", "0")
    [medium] = participants_with_role(root, "110154")
    assert_media(medium, ("110154", "DCM", "Destination Media"), code, "DISCFLOW_20250304_1")
    assert_objects(root, one_patient_studies())


@pytest.mark.parametrize("media, code", [
    ("cd", ("110032", "DCM", "CD")),
    ("dvd", ("110033", "DCM", "DVD")),
    ("usb", ("110030", "DCM", "USB Disk Emulation")),
])
def test_import_message(media: str, code: tuple[str, str, str]) -> None:
    root = ET.fromstring(import_xml(media, outcome=4))
    assert_schema_valid(root)
    assert_import_table(root)
    assert_event(root, ("110107", "DCM", "Import"), "C", "4")
    [medium] = participants_with_role(root, "110155")
    assert_media(medium, ("110155", "DCM", "Source Media"), code, "ST_ELSEWHERE_CT")
    assert_objects(root, two_patient_studies())
    assert len(patient_objects(root)) == 2


@pytest.mark.parametrize("action", ["C", "R"])
def test_instances_transferred_message(action: str) -> None:
    root = ET.fromstring(transferred_xml(action, outcome=8))
    assert_schema_valid(root)
    assert_transferred_table(root)
    assert_event(root, ("110104", "DCM", "DICOM Instances Transferred"), action, "8")
    assert_objects(root, one_patient_studies())
    assert not root.findall(".//MediaIdentifier"), "a network transfer has no media participant"


def test_export_of_two_patients_names_both() -> None:
    root = ET.fromstring(export_xml(studies=two_patient_studies()))
    assert_schema_valid(root)
    assert {o.get("ParticipantObjectID") for o in patient_objects(root)} == {"DF-1", "DF-2"}
    assert_objects(root, two_patient_studies())


def test_instances_transferred_refuses_two_patients() -> None:
    with pytest.raises(ValueError, match="one patient"):
        instances_transferred_message(two_patient_studies(), outcome=0, action="R", source_ae="A",
                                      destination_ae="B", destination_host="pacs", user="u", source_id="s")


def test_patient_without_name_has_no_empty_name_element() -> None:
    root = ET.fromstring(export_xml(studies=[AuditStudy(STUDY_A, {CT: 1}, patient_id="X")]))
    assert_schema_valid(root)
    [patient] = patient_objects(root)
    assert patient.get("ParticipantObjectID") == "X" and patient.find("ParticipantObjectName") is None


def test_xml_special_characters_are_escaped() -> None:
    studies = [AuditStudy(STUDY_A, {CT: 1}, patient_id='P<1>&"', patient_name="O'BRIEN^ZOË <VIP>")]
    text = export_message(studies, outcome=0, media="cd", user="a&b", source_id="s<1>", destination='x"y')
    root = ET.fromstring(text)
    [patient] = patient_objects(root)
    assert patient.get("ParticipantObjectID") == 'P<1>&"'
    assert patient.findtext("ParticipantObjectName") == "O'BRIEN^ZOË <VIP>"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "s<1>"


def test_event_time_defaults_to_now_in_utc() -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    stamp = ET.fromstring(export_message(one_patient_studies(), outcome=0, media="cd", user="u", source_id="s",
                                         destination="d")).find("EventIdentification").get("EventDateTime")
    assert stamp.endswith("Z")
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before <= moment <= datetime.now(timezone.utc)


@pytest.mark.parametrize("status, code", [("succeeded", 0), ("partial", 4), ("failed", 8), ("cancelled", 4)])
def test_outcome_code(status: str, code: int) -> None:
    assert outcome_code(status) == code


@pytest.mark.parametrize("call", [
    lambda: outcome_code("exploded"),
    lambda: export_xml(media="floppy"),
    lambda: export_xml(outcome=3),
    lambda: export_xml(studies=[]),
    lambda: transferred_xml(action="D"),
    lambda: export_message(one_patient_studies(), outcome=0, media="cd", user="", source_id="s", destination="d"),
])
def test_invalid_input_is_refused(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_schema_checker_catches_a_misplaced_element() -> None:
    """The hand-written schema check must be able to fail."""
    root = ET.fromstring(export_xml())
    root.insert(0, root.find("AuditSourceIdentification"))
    with pytest.raises(AssertionError):
        assert_schema_valid(root)
    bad = ET.fromstring(export_xml())
    bad.find("EventIdentification").set("EventOutcomeIndicator", "3")
    with pytest.raises(AssertionError):
        assert_schema_valid(bad)


# --------------------------------------------------------------------------------------------------
# Syslog, over real sockets

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?P<version>1) "
    rb"(?P<timestamp>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})) "
    rb"(?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    rb"(?P<sd>-|\[.*?\]) (?P<msg>.*)$", re.DOTALL)


def assert_rfc5424(frame: bytes, xml: str, *, pri: int, hostname: str, app: str) -> None:
    match = RFC5424.match(frame)
    assert match, frame[:200]
    assert int(match["pri"]) == pri
    assert match["version"] == b"1"
    stamp = datetime.fromisoformat(match["timestamp"].decode().replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(seconds=30)
    assert match["hostname"].decode() == hostname
    assert match["app"].decode() == app
    assert match["procid"].decode().isdigit()
    assert match["msgid"] == b"IHE+RFC-3881"
    assert match["msg"].startswith(b"\xef\xbb\xbf")               # MSG-UTF8: BOM, then UTF-8
    assert match["msg"][3:].decode("utf-8") == xml
    ET.fromstring(match["msg"][3:])                               # and still well-formed XML


def test_syslog_over_udp() -> None:
    xml = export_xml()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        send_syslog(xml, f"udp://127.0.0.1:{server.getsockname()[1]}", hostname="ws1.radiology.example.org")
        frame, _ = server.recvfrom(65535)
    assert_rfc5424(frame, xml, pri=10 * 8 + 5, hostname="ws1.radiology.example.org", app="discflow")


def test_syslog_over_tcp_is_octet_counted() -> None:
    xml = import_xml(outcome=8)                       # a failure goes out as a warning
    received = bytearray()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(5)

        def accept() -> None:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(5)
                while chunk := connection.recv(65536):
                    received.extend(chunk)

        reader = threading.Thread(target=accept)
        reader.start()
        send_syslog(xml, f"tcp://127.0.0.1:{server.getsockname()[1]}", app_name="discflow-import", hostname="ws1")
        reader.join(10)
    assert not reader.is_alive()
    length, space, frame = bytes(received).partition(b" ")
    assert space == b" " and length.isdigit() and not length.startswith(b"0")
    assert int(length) == len(frame)                  # exactly one frame, nothing trailing
    assert_rfc5424(frame, xml, pri=10 * 8 + 4, hostname="ws1", app="discflow-import")


def test_syslog_over_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "log"
    xml = transferred_xml()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        send_syslog(xml, f"unix://{path}", hostname="ws1")
        frame = server.recv(65535)
    assert_rfc5424(frame, xml, pri=85, hostname="ws1", app="discflow")


def test_syslog_frame_defaults_and_header_hygiene() -> None:
    frame = syslog_frame(export_xml(), app_name="disc flow", hostname="")
    match = RFC5424.match(frame)
    assert match and match["app"] == b"discflow"      # spaces are not allowed in APP-NAME
    assert match["hostname"] == socket.getfqdn().encode() or match["hostname"] == b"-"


def test_syslog_refuses_other_urls_and_non_audit_text() -> None:
    with pytest.raises(ValueError):
        send_syslog(export_xml(), "http://127.0.0.1:514")
    with pytest.raises(ValueError):
        send_syslog("<not-audit/>", "udp://127.0.0.1:9")
