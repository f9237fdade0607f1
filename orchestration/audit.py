"""DICOM audit messages (PS3.15 A.5) for disc export, disc import and C-STORE transfers, and syslog delivery.

Message structure follows the DICOM Audit Message Schema (PS3.15 A.5.1, RELAX NG compact) and the
per-event tables:

- Data Export                 PS3.15 A.5.3.4, EV (110106, DCM, "Export"), EventActionCode R
- Data Import                 PS3.15 A.5.3.5, EV (110107, DCM, "Import"), EventActionCode C
- DICOM Instances Transferred PS3.15 A.5.3.7, EV (110104, DCM, "DICOM Instances Transferred"), C / R / U

Coded values use the current schema's attribute names (csd-code, codeSystemName, originalText;
CP-1638), not RFC 3881's code/displayName. Media types come from CID 405 "Media Type Code"
(PS3.16): 110030 USB Disk Emulation, 110032 CD, 110033 DVD. CID 405 has no Blu-ray code and is
extensible (DCID), so BD is sent under a private coding scheme designator (99DISCFLOW).

Delivery follows PS3.15 A.6 / IHE ATNA: RFC 5424 syslog, MSGID "IHE+RFC-3881", facility 10
(authpriv), over UDP (RFC 5426, one message per datagram) or TCP with RFC 5425/6587
octet-counting framing, or the local syslog socket.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit


@dataclass
class AuditStudy:
    study_instance_uid: str
    sop_classes: dict[str, int]          # SOP Class UID -> number of instances
    patient_id: str = ""
    patient_name: str = ""


class Code(NamedTuple):
    """A coded value: the schema's CodedValueType (csd-code, codeSystemName, originalText)."""
    value: str
    scheme: str
    meaning: str


EVENT_EXPORT = Code("110106", "DCM", "Export")
EVENT_IMPORT = Code("110107", "DCM", "Import")
EVENT_INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")

ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
ROLE_DESTINATION_MEDIA = Code("110154", "DCM", "Destination Media")
ROLE_SOURCE_MEDIA = Code("110155", "DCM", "Source Media")

STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")   # the tables' EV (2, RFC-3881, "Patient Number")

# CID 405 "Media Type Code". Dual-layer DVD is still a DVD; BD has no DCM code (private scheme).
MEDIA_TYPES: dict[str, Code] = {
    "cd": Code("110032", "DCM", "CD"),
    "dvd": Code("110033", "DCM", "DVD"),
    "dvd-dl": Code("110033", "DCM", "DVD"),
    "bd": Code("BD", "99DISCFLOW", "Blu-ray Disc"),
    "usb": Code("110030", "DCM", "USB Disk Emulation"),
}

OUTCOMES = {"succeeded": 0, "partial": 4, "failed": 8, "cancelled": 4}
OUTCOME_VALUES = (0, 4, 8, 12)        # success, minor, serious, major failure (A.5.1 schema enumeration)
TRANSFER_ACTIONS = ("C", "R", "U")    # A.5.3.7: create on a receiver without copies, read, update

AUDIT_SOURCE_APPLICATION_SERVER = "4"  # A.5.1.2.1 Audit Source Type: application server process tier
PARTICIPANT_PERSON, PARTICIPANT_SYSTEM = "1", "2"
ROLE_PATIENT, ROLE_REPORT = "1", "3"
ACCESS_POINT_MACHINE_NAME, ACCESS_POINT_IP = "1", "2"

APPLICATION_NAME = "discflow"


def outcome_code(status: str) -> int:
    """EventOutcomeIndicator for a job status: a partly written disc is a minor failure, a lost one serious."""
    try:
        return OUTCOMES[status]
    except KeyError:
        raise ValueError(f"unknown job status {status!r}; expected one of {sorted(OUTCOMES)}") from None


def media_type(media: str) -> Code:
    """The CID 405 code for a discflow media kind ("cd", "dvd", "dvd-dl", "bd", "usb")."""
    try:
        return MEDIA_TYPES[media.lower()]
    except KeyError:
        raise ValueError(f"unknown media {media!r}; expected one of {sorted(MEDIA_TYPES)}") from None


# --------------------------------------------------------------------------------------------------
# The three messages


def export_message(studies: list[AuditStudy], *, outcome: int, media: str, user: str,
                   source_id: str, destination: str, when: datetime | None = None) -> str:
    """Data Export (A.5.3.4): studies leave this security domain on a disc or USB stick.

    `destination` identifies the written media (URI, image path or volume label): it becomes the
    Destination Media participant's UserID, as A.5.2.1 asks for media.
    """
    message = _message(EVENT_EXPORT, "R", outcome, when)
    _participant(message, user, requestor=True, roles=[ROLE_SOURCE])
    _process_participant(message, ROLE_SOURCE)
    _media_participant(message, destination, ROLE_DESTINATION_MEDIA, media_type(media))
    _finish(message, source_id, studies)
    return _serialise(message)


def import_message(studies: list[AuditStudy], *, outcome: int, media: str, user: str,
                   source_id: str, source_media_label: str, when: datetime | None = None) -> str:
    """Data Import (A.5.3.5): studies from outside media become local instances."""
    message = _message(EVENT_IMPORT, "C", outcome, when)
    _participant(message, user, requestor=True, roles=[ROLE_DESTINATION])
    _process_participant(message, ROLE_DESTINATION)
    _media_participant(message, source_media_label, ROLE_SOURCE_MEDIA, media_type(media))
    _finish(message, source_id, studies)
    return _serialise(message)


def instances_transferred_message(studies: list[AuditStudy], *, outcome: int, action: str, source_ae: str,
                                  destination_ae: str, destination_host: str, user: str, source_id: str,
                                  when: datetime | None = None) -> str:
    """DICOM Instances Transferred (A.5.3.7): a finished C-STORE of one patient's studies.

    `action` is "C" when the receiver reports new copies, "R" when the sender reports (it cannot
    know whether the receiver already held them), "U" when the receiver updated its copies.
    """
    if action not in TRANSFER_ACTIONS:
        raise ValueError(f"EventActionCode for 110104 must be one of {TRANSFER_ACTIONS}, got {action!r}")
    _require_single_patient(studies)      # the table allows one patient per message
    message = _message(EVENT_INSTANCES_TRANSFERRED, action, outcome, when)
    _ae_participant(message, source_ae, ROLE_SOURCE)
    _ae_participant(message, destination_ae, ROLE_DESTINATION, host=destination_host)
    _participant(message, user, requestor=True, roles=[])    # "other participants ... the requestor"
    _finish(message, source_id, studies)
    return _serialise(message)


# --------------------------------------------------------------------------------------------------
# Building blocks, in schema order: EventIdentification, ActiveParticipant+, AuditSourceIdentification,
# ParticipantObjectIdentification*


def _message(event: Code, action: str, outcome: int, when: datetime | None) -> ET.Element:
    if outcome not in OUTCOME_VALUES:
        raise ValueError(f"EventOutcomeIndicator must be one of {OUTCOME_VALUES}, got {outcome!r}")
    message = ET.Element("AuditMessage")
    event_element = ET.SubElement(message, "EventIdentification", {
        "EventActionCode": action,
        "EventDateTime": _event_datetime(when),
        "EventOutcomeIndicator": str(outcome),
    })
    _coded(event_element, "EventID", event)
    return message


def _event_datetime(when: datetime | None) -> str:
    """xsd:dateTime in UTC: A.5.2 wants a time unambiguous as to local time zones.

    A naive datetime is taken as local time (what datetime.now() returns), never silently as UTC.
    """
    moment = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                       "originalText": code.meaning})


def _participant(message: ET.Element, user_id: str, *, requestor: bool, roles: list[Code],
                 attributes: dict[str, str] | None = None) -> ET.Element:
    if not user_id:
        raise ValueError("an ActiveParticipant needs a UserID (A.5.2.1)")
    element = ET.SubElement(message, "ActiveParticipant", {
        "UserID": user_id, **(attributes or {}), "UserIsRequestor": "true" if requestor else "false"})
    for role in roles:
        _coded(element, "RoleIDCode", role)
    return element


def _process_participant(message: ET.Element, role: Code) -> None:
    """The discflow process next to the person: A.5.3.4/5 want both when both are known.

    AlternativeUserID is the process id, so the record matches the local process logs (A.5.2.1).
    """
    _participant(message, APPLICATION_NAME, requestor=False, roles=[role], attributes={
        "AlternativeUserID": str(os.getpid()),
        "NetworkAccessPointID": socket.gethostname(),
        "NetworkAccessPointTypeCode": ACCESS_POINT_MACHINE_NAME,
    })


def _media_participant(message: ET.Element, media_id: str, role: Code, kind: Code) -> None:
    """The disc itself: never the requestor; MediaIdentifier/MediaType carry the CID 405 code."""
    element = _participant(message, media_id, requestor=False, roles=[role])
    _coded(ET.SubElement(element, "MediaIdentifier"), "MediaType", kind)


def _ae_participant(message: ET.Element, ae_title: str, role: Code, host: str = "") -> None:
    """A DICOM application: A.5.2.2 puts its AE title in AlternativeUserID as "AETITLES=..."."""
    attributes = {"AlternativeUserID": f"AETITLES={ae_title}"}
    if host:
        attributes["NetworkAccessPointID"] = host
        attributes["NetworkAccessPointTypeCode"] = _access_point_type(host)
    _participant(message, ae_title, requestor=False, roles=[role], attributes=attributes)


def _access_point_type(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ACCESS_POINT_MACHINE_NAME
    return ACCESS_POINT_IP


def _finish(message: ET.Element, source_id: str, studies: list[AuditStudy]) -> None:
    """The audit source, then a participant object per study and one per distinct patient."""
    if not studies:
        raise ValueError("an audit message needs at least one study: its patient participant is mandatory")
    if not source_id:
        raise ValueError("AuditSourceID is mandatory")
    source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_APPLICATION_SERVER})
    for study in studies:
        _study_object(message, study)
    for patient_id, patient_name in _patients(studies).items():
        _patient_object(message, patient_id, patient_name)


def _study_object(message: ET.Element, study: AuditStudy) -> None:
    element = ET.SubElement(message, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_instance_uid,
        "ParticipantObjectTypeCode": PARTICIPANT_SYSTEM,
        "ParticipantObjectTypeCodeRole": ROLE_REPORT,
    })
    _coded(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    description = ET.SubElement(element, "ParticipantObjectDescription")
    for sop_class_uid, count in sorted(study.sop_classes.items()):
        if count < 0:
            raise ValueError(f"negative instance count for SOP Class {sop_class_uid}")
        ET.SubElement(description, "SOPClass", {"UID": sop_class_uid, "NumberOfInstances": str(count)})


def _patients(studies: list[AuditStudy]) -> dict[str, str]:
    """Distinct patients by Patient ID, first non-empty name kept: one participant object each."""
    patients: dict[str, str] = {}
    for study in studies:
        if not patients.get(study.patient_id):
            patients[study.patient_id] = study.patient_name
    return patients


def _patient_object(message: ET.Element, patient_id: str, patient_name: str) -> None:
    element = ET.SubElement(message, "ParticipantObjectIdentification", {
        "ParticipantObjectID": patient_id,
        "ParticipantObjectTypeCode": PARTICIPANT_PERSON,
        "ParticipantObjectTypeCodeRole": ROLE_PATIENT,
    })
    _coded(element, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if patient_name:
        ET.SubElement(element, "ParticipantObjectName").text = patient_name


def _require_single_patient(studies: list[AuditStudy]) -> None:
    patient_ids = {study.patient_id for study in studies}
    if len(patient_ids) > 1:
        raise ValueError(f"DICOM Instances Transferred covers one patient, got {len(patient_ids)}: "
                         "send one message per patient")


def _serialise(message: ET.Element) -> str:
    # No XML declaration: the syslog MSG and the ledger column carry UTF-8 text either way.
    return ET.tostring(message, encoding="unicode")


# --------------------------------------------------------------------------------------------------
# Syslog delivery (RFC 5424 message; RFC 5426 UDP, RFC 5425/6587 octet-counted stream)

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
SYSLOG_MSGID = "IHE+RFC-3881"        # PS3.15 A.6 / IHE ITI-20
UTF8_BOM = b"\xef\xbb\xbf"           # RFC 5424 MSG-UTF8 starts with a BOM
DEFAULT_PORTS = {"udp": 514, "tcp": 601}
SEND_TIMEOUT_SECONDS = 5.0


def send_syslog(message: str, url: str, *, app_name: str = "discflow", hostname: str | None = None) -> None:
    """Send one audit message to an audit record repository: udp://host:514, tcp://host:601, unix:///dev/log.

    Severity is notice for a successful event and warning for any failure, read from the message
    itself so a caller cannot send a failure as routine.
    """
    frame = syslog_frame(message, app_name=app_name, hostname=hostname)
    target = urlsplit(url)
    if target.scheme == "udp":
        _send_udp(frame, target.hostname or "localhost", target.port or DEFAULT_PORTS["udp"])
    elif target.scheme == "tcp":
        _send_tcp(frame, target.hostname or "localhost", target.port or DEFAULT_PORTS["tcp"])
    elif target.scheme == "unix":
        _send_unix(frame, target.path or "/dev/log")
    else:
        raise ValueError(f"unsupported syslog URL {url!r}: use udp://, tcp:// or unix://")


def syslog_frame(message: str, *, app_name: str = "discflow", hostname: str | None = None,
                 now: datetime | None = None) -> bytes:
    """One RFC 5424 SYSLOG-MSG: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML."""
    pri = FACILITY_AUTHPRIV * 8 + _severity(message)
    timestamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    header = " ".join([
        f"<{pri}>1",
        timestamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        _header_field(hostname or socket.getfqdn(), 255),
        _header_field(app_name, 48),
        _header_field(str(os.getpid()), 128),
        SYSLOG_MSGID,
        "-",                                 # no STRUCTURED-DATA
    ])
    return header.encode("ascii") + b" " + UTF8_BOM + message.encode("utf-8")


def _severity(message: str) -> int:
    try:
        outcome = ET.fromstring(message).find("EventIdentification").get("EventOutcomeIndicator")
    except (ET.ParseError, AttributeError):
        raise ValueError("not a DICOM audit message: no EventIdentification/@EventOutcomeIndicator") from None
    return SEVERITY_NOTICE if outcome == "0" else SEVERITY_WARNING


def _header_field(value: str, limit: int) -> str:
    """RFC 5424 header fields are 1..limit printable US-ASCII characters; '-' stands for unknown."""
    printable = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return printable or "-"


def _octet_counted(frame: bytes) -> bytes:
    # RFC 5425 section 4.3 / RFC 6587 section 3.4.1: MSG-LEN SP SYSLOG-MSG, no trailer to escape.
    return str(len(frame)).encode("ascii") + b" " + frame


def _send_udp(frame: bytes, host: str, port: int) -> None:
    # RFC 5426: exactly one syslog message per datagram, no framing.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(frame, (host, port))


def _send_tcp(frame: bytes, host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=SEND_TIMEOUT_SECONDS) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # DESIGN: NODELAY on every socket
        sock.sendall(_octet_counted(frame))


def _send_unix(frame: bytes, path: str) -> None:
    """The local daemon's socket is a datagram socket on Linux; a stream one gets octet counting."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.send(frame)
            return
    except OSError as error:
        if error.errno != errno.EPROTOTYPE:
            raise
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SEND_TIMEOUT_SECONDS)
        sock.connect(path)
        sock.sendall(_octet_counted(frame))
