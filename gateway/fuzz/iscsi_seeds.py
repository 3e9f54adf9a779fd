#!/usr/bin/env python3
"""Write the hand-made seeds of the iSCSI fuzz targets into corpus/iscsi_*.

Each seed is one selector byte (see tessera_gateway::iscsi::fuzz) followed by
what a real initiator sends: login PDUs, full-feature PDUs, or a CDB with its
parameter list. Layouts per RFC 7143 §11 and SPC-4/SBC-4. Run from
gateway/fuzz: ./iscsi_seeds.py (idempotent; file names are content hashes).
"""
import hashlib
import os
import struct

IQN = b"iqn.2026-11.io.tessera:a"


def pdu(op, flags, *, imm=False, lun=0, itt=1, f20=0, f24=1, f28=1, f32=0,
        spec=b"", data=b""):
    """A BHS (48 bytes) with the fields the fuzz drivers look at, and data
    padded to 4 bytes. spec fills bytes 32..48 (CDB) when given."""
    b = bytearray(48)
    b[0] = op | (0x40 if imm else 0)
    b[1] = flags
    b[5:8] = len(data).to_bytes(3, "big")
    b[8:16] = struct.pack(">Q", lun)
    b[16:20] = struct.pack(">I", itt)
    b[20:24] = struct.pack(">I", f20)
    b[24:28] = struct.pack(">I", f24)
    b[28:32] = struct.pack(">I", f28)
    b[32:36] = struct.pack(">I", f32)
    if spec:
        b[32:32 + len(spec)] = spec
    pad = (4 - len(data) % 4) % 4
    return bytes(b) + data + b"\0" * pad


def text(*pairs):
    return b"".join(k.encode() + b"=" + v.encode() + b"\0" for k, v in pairs)


def login_pdu(csg, nsg, transit, data, isid=b"\x40\0\0\0\0\x01", itt=0, cmd_sn=1,
              cont=False):
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | csg << 2 | nsg
    p = bytearray(pdu(0x03, flags, imm=True, itt=itt, f24=cmd_sn, f28=0, data=data))
    p[8:14] = isid
    return bytes(p)


OPERATIONAL = [("HeaderDigest", "None"), ("DataDigest", "None"),
               ("MaxRecvDataSegmentLength", "262144"), ("MaxBurstLength", "1048576"),
               ("FirstBurstLength", "262144"), ("InitialR2T", "No"),
               ("ImmediateData", "Yes"), ("MaxOutstandingR2T", "1"),
               ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
               ("ErrorRecoveryLevel", "0"), ("MaxConnections", "1")]


def login_seeds():
    i = ("InitiatorName", "iqn.fuzz:i")
    t = ("TargetName", IQN.decode())
    seeds = []
    # Selector 0: open volume, straight to operational, then full feature.
    seeds.append(bytes([0]) + login_pdu(1, 3, True, text(i, t, *OPERATIONAL)))
    # Security stage with AuthMethod=None, then operational.
    seeds.append(bytes([0]) + login_pdu(0, 1, True, text(i, t, ("AuthMethod", "None")))
                 + login_pdu(1, 3, True, text(*OPERATIONAL)))
    # Discovery session.
    seeds.append(bytes([0]) + login_pdu(1, 3, True, text(i, ("SessionType", "Discovery"),
                                                          ("HeaderDigest", "CRC32C,None"))))
    # Selector 1: one-way CHAP with the right response (challenge = [1]*16,
    # identifier 1, secret "alice-secret-1").
    sel, secret = 1, b"alice-secret-1"
    resp = hashlib.md5(bytes([sel]) + secret + bytes([sel] * 16)).hexdigest()
    seeds.append(bytes([sel])
                 + login_pdu(0, 1, False, text(i, t, ("AuthMethod", "CHAP,None")))
                 + login_pdu(0, 1, False, text(("CHAP_A", "5")))
                 + login_pdu(0, 1, True, text(("CHAP_N", "alice"), ("CHAP_R", "0x" + resp)))
                 + login_pdu(1, 3, True, text(*OPERATIONAL)))
    # Selector 2: mutual CHAP (the initiator challenges back).
    sel = 2
    resp = hashlib.md5(bytes([sel]) + secret + bytes([sel] * 16)).hexdigest()
    seeds.append(bytes([sel])
                 + login_pdu(0, 1, False, text(i, t, ("AuthMethod", "CHAP")))
                 + login_pdu(0, 1, False, text(("CHAP_A", "7,5")))
                 + login_pdu(0, 1, True, text(("CHAP_N", "alice"), ("CHAP_R", "0x" + resp),
                                              ("CHAP_I", "9"),
                                              ("CHAP_C", "0x" + "ab" * 16)))
                 + login_pdu(1, 3, True, text(*OPERATIONAL)))
    # Selector 3: denied; 4: unavailable; bad keys and values.
    seeds.append(bytes([3]) + login_pdu(1, 3, True, text(i, t)))
    seeds.append(bytes([0]) + login_pdu(1, 3, True, text(
        i, t, ("MaxBurstLength", "1"), ("X-com.example", "1"), ("FirstBurstLength", "0x100000"))))
    # Text continued over two PDUs (C bit).
    body = text(i, t, *OPERATIONAL)
    seeds.append(bytes([0]) + login_pdu(1, 3, False, body[:40], cont=True)
                 + login_pdu(1, 3, True, body[40:]))
    return seeds


def scsi_cmd(itt, cmd_sn, cdb, edtl=0, read=False, write=False, data=b"", final=True):
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
    return pdu(0x01, flags, itt=itt, f20=edtl, f24=cmd_sn, f28=1,
               spec=cdb.ljust(16, b"\0"), data=data)


def pdu_seeds():
    read10 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0])
    write10 = bytes([0x2a, 0, 0, 0, 0, 16, 0, 0, 4, 0])
    inquiry = bytes([0x12, 0, 0, 0, 0xff, 0])
    seeds = []
    # Selector 0x0c: immediate data, InitialR2T=Yes; commands in order.
    s = [scsi_cmd(1, 1, inquiry, 255, read=True),
         scsi_cmd(2, 2, read10, 4096, read=True),
         scsi_cmd(3, 3, write10, 2048, write=True, data=b"\xa5" * 1024),
         # Data-Out for the rest (TTT all ones = unsolicited, DataSN 0, offset 1024).
         pdu(0x05, 0x80, itt=3, f20=0xffffffff, f24=0, f28=1, f32=0,
             spec=struct.pack(">IIII", 0, 0, 1024, 0), data=b"\x5a" * 1024),
         pdu(0x00, 0x80, imm=True, itt=9, f20=0xffffffff, f24=4, data=b"ping"),
         # TMF ABORT TASK (function 1) for itt 2.
         pdu(0x02, 0x81, imm=True, itt=10, f20=2, f24=4, f32=2),
         # Logout (close session).
         pdu(0x06, 0x80, imm=True, itt=11, f24=4)]
    seeds.append(bytes([0x04]) + b"".join(s))
    # Out-of-window CmdSN, a SNACK, an unknown opcode.
    seeds.append(bytes([0x04]) + scsi_cmd(1, 100, read10, 4096, read=True)
                 + pdu(0x10, 0x80, itt=1) + pdu(0x1e, 0x80, itt=2))
    # Discovery session (selector bit 7): SendTargets=All.
    seeds.append(bytes([0x80]) + pdu(0x04, 0x80, imm=True, itt=1, f20=0xffffffff, f24=1,
                                     data=text(("SendTargets", "All"))))
    # Header and data digests on (selector 3) with a wrong header digest
    # (CRC32C is not in Python's standard library; the fuzzer finds right
    # ones from the session's own answers in other seeds).
    seeds.append(bytes([0x03]) + scsi_cmd(1, 1, inquiry, 255, read=True) + b"\0" * 4)
    # Write with R2T (no immediate data, InitialR2T=Yes: selector 8).
    seeds.append(bytes([0x08]) + scsi_cmd(1, 1, write10, 2048, write=True)
                 + pdu(0x05, 0x80, itt=1, f20=1, f24=0, f28=1,
                       spec=struct.pack(">IIII", 0, 0, 0, 0), data=b"\x11" * 2048))
    return seeds


def cdb_seeds():
    def s(sel, cdb, params=b""):
        return bytes([sel]) + cdb.ljust(16, b"\0") + params
    unmap_list = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 8, 8)
    pr_register = struct.pack(">QQ4xB3x", 0, 0xabc, 0)
    mode_select6 = bytes([0, 0, 0, 0]) + bytes([0x08, 0x12, 0x04]) + bytes(17)
    return [
        s(6, bytes([0x28, 0x08, 0, 0, 0, 10, 0, 0, 4, 0])),           # READ(10) FUA
        s(6, bytes([0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0])),  # WRITE(16)
        s(6, bytes([0x08, 0, 0, 0, 0, 0])),                            # READ(6) 256 blocks
        s(6, bytes([0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])),  # WRITE SAME(16) UNMAP
        s(6, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), unmap_list),  # UNMAP
        s(6, bytes([0x1a, 0, 0x3f, 0, 0xff, 0])),                      # MODE SENSE(6) all pages
        s(6, bytes([0x5a, 0x08, 0x08, 0, 0, 0, 0, 0x10, 0, 0])),       # MODE SENSE(10) caching
        s(6, bytes([0x15, 0x10, 0, 0, 24, 0]), mode_select6),          # MODE SELECT(6)
        s(6, bytes([0x5f, 0x00, 0, 0, 0, 0, 0, 0, 24, 0]), pr_register),  # PR OUT REGISTER
        s(6, bytes([0x5e, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0])),          # PR IN READ FULL STATUS
        s(6, bytes([0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0])), # RSOC one command
        s(6, bytes([0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])), # RSOC all, RCTD
        s(6, bytes([0x12, 0x01, 0xb0, 0, 0xff, 0])),                    # INQUIRY VPD B0
        s(7, bytes([0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0])),  # GET LBA STATUS
        s(6, bytes([0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0])),  # READ CAPACITY(16)
        s(6, bytes([0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])),  # COMPARE AND WRITE
        s(9, bytes([0x88, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0])),  # beyond end
        s(6, bytes([0x35, 0x02, 0, 0, 0, 0, 0, 0, 0, 0])),             # SYNCHRONIZE CACHE(10)
        s(6, bytes([0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0])),       # REPORT LUNS
    ]


def write(target, seeds):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    for s in seeds:
        with open(os.path.join(d, hashlib.sha1(s).hexdigest()), "wb") as f:
            f.write(s)


if __name__ == "__main__":
    write("iscsi_login", login_seeds())
    write("iscsi_pdu", pdu_seeds())
    write("iscsi_cdb", cdb_seeds())
