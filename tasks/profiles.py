"""Media profiles and media types: which transfer syntaxes a disc may hold, and how much fits.

Profiles (PS3.11 Annex D and a national guideline)
    Each profile bounds the transfer syntaxes of the files on the media; the tables live in
    :data:`tasks.dicomdir.PROFILE_TRANSFER_SYNTAXES` (one source for the DICOMDIR writer, the
    export planner and the validator). ``GUIDELINE`` allows what the DVD JPEG profile allows
    (Explicit VR Little Endian, JPEG lossless SV1, JPEG baseline/extended) and also asks for the
    report and a viewer with autorun on every disc.

``auto`` (the default)
    The least restrictive general-purpose profile that admits the syntaxes on the disc, so that a
    plain uncompressed export is STD-GEN-CD and a JPEG export STD-GEN-DVD-JPEG (STD-GEN-USB-JPEG on
    USB). Files whose syntax no general-purpose profile allows (Implicit VR, Big Endian, Deflated,
    RLE, JPEG-LS, HTJ2K, ...) are converted first, so even ``auto`` never leaves a file on the disc
    that a conformant reader may refuse.

Conversion for a profile
    With ``--syntax keep`` only the files the profile forbids are converted, always to Explicit VR
    Little Endian: every profile allows it, it loses nothing, and a lossy source never gets a second
    generation of loss. Native sources (Implicit VR, Deflated) are rewritten without a pixel decode.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.uid import ExplicitVRLittleEndian

from tasks.dicomdir import PROFILE_TRANSFER_SYNTAXES
from tasks.manifest import Manifest
from tasks.transfer_syntax import POLICIES, needs_conversion

if TYPE_CHECKING:
    from tasks.manifest import ManifestBuilder
    from tasks.spool import JobSpool

__all__ = ["AUTO", "MEDIA_CAPACITY_BYTES", "PROFILES", "ProfileError", "Profile", "check_policy",
           "plan_profile_conversions", "resolve_profile"]

AUTO = "auto"


@dataclass(frozen=True)
class Profile:
    name: str
    transfer_syntaxes: frozenset[str]
    requires_report: bool = False
    requires_viewer: bool = False
    dcmmkdir_option: str | None = None
    """DCMTK dcmmkdir's option for the same profile (used by tests to cross-check)."""


PROFILES: dict[str, Profile] = {
    "STD-GEN-CD": Profile("STD-GEN-CD", PROFILE_TRANSFER_SYNTAXES["STD-GEN-CD"], dcmmkdir_option="-Pgp"),
    "STD-GEN-DVD-JPEG": Profile("STD-GEN-DVD-JPEG", PROFILE_TRANSFER_SYNTAXES["STD-GEN-DVD-JPEG"],
                                dcmmkdir_option="-Pdv"),
    "STD-GEN-DVD-J2K": Profile("STD-GEN-DVD-J2K", PROFILE_TRANSFER_SYNTAXES["STD-GEN-DVD-J2K"],
                               dcmmkdir_option="-Pd2"),
    "STD-GEN-USB-JPEG": Profile("STD-GEN-USB-JPEG", PROFILE_TRANSFER_SYNTAXES["STD-GEN-USB-JPEG"],
                                dcmmkdir_option="-Pfl"),
    "STD-GEN-USB-J2K": Profile("STD-GEN-USB-J2K", PROFILE_TRANSFER_SYNTAXES["STD-GEN-USB-J2K"],
                               dcmmkdir_option="-Pf2"),
    "GUIDELINE": Profile("GUIDELINE", PROFILE_TRANSFER_SYNTAXES["GUIDELINE"], requires_report=True,
                         requires_viewer=True, dcmmkdir_option="-Pdv"),
}

MEDIA_CAPACITY_BYTES: dict[str, int | None] = {
    "cd": 700_000_000,         # 80-minute CD-R: 737,280,000 bytes; nominal "700 MB" leaves a margin
    "dvd": 4_700_000_000,      # DVD-R 4,700,372,992 / DVD+R 4,700,372,992 bytes
    "dvd-dl": 8_500_000_000,   # DVD-R DL 8,543,666,176 / DVD+R DL 8,547,991,552 bytes
    "bd": 25_000_000_000,      # BD-R single layer 25,025,314,816 bytes
    "usb": None,               # a folder tree; one volume unless --volume-capacity is given
}
"""Usable bytes per medium (ISO image size, before the per-volume overheads in volume_plan)."""

# auto: the first profile of the family that admits every syntax on the disc.
_AUTO_ORDER = {"usb": ("STD-GEN-CD", "STD-GEN-USB-JPEG", "STD-GEN-USB-J2K"),
               "disc": ("STD-GEN-CD", "STD-GEN-DVD-JPEG", "STD-GEN-DVD-J2K")}


class ProfileError(ValueError):
    """A profile, media type or policy combination that cannot work; the message is for the operator."""


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name.upper()]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r}; choose auto or one of {', '.join(PROFILES)}") from None


def check_policy(policy: str, profile: str | None) -> None:
    """Refuse a syntax policy whose target the chosen profile forbids (e.g. j2k on STD-GEN-CD)."""
    target = POLICIES.get(policy)
    if target is None or not profile or profile == AUTO:
        return
    chosen = profile_named(profile)
    if target not in chosen.transfer_syntaxes:
        fits = [p.name for p in PROFILES.values() if target in p.transfer_syntaxes]
        raise ProfileError(f"profile {chosen.name} does not allow --syntax {policy}; use --syntax uncompressed "
                           f"or a profile that allows it ({', '.join(fits)})")


def resolve_profile(profile: str | None, transfer_syntaxes: set[str], media: str = "cd") -> Profile:
    """The profile a job writes: the named one, or for ``auto`` the least restrictive
    general-purpose profile of the media's family that admits every syntax in ``transfer_syntaxes``
    (syntaxes no such profile admits are converted; see :func:`plan_profile_conversions`)."""
    if profile and profile != AUTO:
        return profile_named(profile)
    family = _AUTO_ORDER["usb" if media == "usb" else "disc"]
    admissible = {s for s in transfer_syntaxes if any(s in PROFILES[n].transfer_syntaxes for n in family)}
    for name in family:
        if admissible <= PROFILES[name].transfer_syntaxes:
            return PROFILES[name]
    return PROFILES[family[-1]]


def _has_pixels(attributes: dict) -> bool:
    """Rows (0028,0010) in the header subset: an image. SR, PDF, KOS and waveforms have none."""
    return "00280010" in attributes


def plan_profile_conversions(manifest: Manifest, policy: str, profile: str | None,
                             media: str = "cd") -> tuple[Profile, list[int]]:
    """Mark each instance's action for ``policy`` within ``profile``; return the resolved profile and
    the indices that need a transcode task. Instances converted only because the profile forbids
    their syntax are listed in ``manifest.options["converted_for_profile"]`` as
    ``{"index", "from", "to"}``, for the summary."""
    check_policy(policy, profile)
    target = POLICIES[policy]
    planned = {i.index: (target if target and _needs(i.transfer_syntax, target, i.attributes) else None)
               for i in manifest.instances}
    syntaxes = {target if planned[i.index] else i.transfer_syntax for i in manifest.instances}
    chosen = resolve_profile(profile, syntaxes, media)
    for_profile = []
    for instance in manifest.instances:
        outcome = planned[instance.index] or instance.transfer_syntax
        if outcome not in chosen.transfer_syntaxes:
            planned[instance.index] = ExplicitVRLittleEndian
            for_profile.append({"index": instance.index, "from": instance.transfer_syntax,
                                "to": str(ExplicitVRLittleEndian)})
        if planned[instance.index]:
            instance.action, instance.target_syntax = "convert", str(planned[instance.index])
    manifest.options.update(profile_resolved=chosen.name, converted_for_profile=for_profile)
    return chosen, [i.index for i in manifest.instances if i.action != "copy"]


def _needs(source: str, target: str, attributes: dict) -> bool:
    # A document or waveform has no pixels to compress: under a compressing policy it keeps an
    # Explicit VR Little Endian encoding (which every profile allows) instead of a pointless rewrite.
    if not _has_pixels(attributes) and source == ExplicitVRLittleEndian:
        return False
    return needs_conversion(source, target)


def conversion_summary(manifest_options: dict) -> dict:
    """What the summary says about conversions the profile forced: a count, per source syntax, files."""
    converted = manifest_options.get("converted_for_profile") or []
    return {"count": len(converted), "by_syntax": dict(Counter(c["from"] for c in converted))}


def missing_reports(manifest: Manifest) -> list[str]:
    """Studies without a report instance (SR or Encapsulated PDF), named by position, not by PHI."""
    from tasks.report_document import REPORT_CLASSES
    with_report = {i.study for i in manifest.instances if i.sop_class_uid in REPORT_CLASSES}
    return [f"study {number} of {len(manifest.studies)} has no report (SR or PDF) and none was given with --report"
            for number in range(1, len(manifest.studies) + 1) if number - 1 not in with_report]


def plan_export(spool: "JobSpool", builder: "ManifestBuilder", request: dict) -> list[int]:
    """Everything the scan stage decides for the media: the reports to add, the profile, and which
    instances to convert (for the policy, or because the profile forbids their syntax). Raises
    ProfileError for a job that cannot meet its profile (a required viewer not configured)."""
    from tasks.report_document import add_reports
    from workers.settings import get_settings

    settings = get_settings()
    add_reports(spool, builder, request, settings.institution_name)
    media = request.get("media") or "cd"
    chosen, work = plan_profile_conversions(builder.manifest, request.get("syntax", "keep"), request.get("profile"),
                                            media)
    if chosen.requires_viewer and not (request.get("viewer_dir") or settings.viewer_dir):
        raise ProfileError(f"profile {chosen.name} requires a viewer on the disc: set DISCFLOW_VIEWER_DIR "
                           f"or give --viewer DIR")
    problems = missing_reports(builder.manifest) if chosen.requires_report else []
    builder.manifest.options["profile_problems"] = problems
    return work
