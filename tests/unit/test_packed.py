"""Planning and diffing in bytes (natctl.packed) agrees with planning Elements (natctl.plan)."""

from natctl import packed
from natctl.kernel import nlbatch, nldump
from natctl.kernel.fake import FakeKernel
from natctl.kernel.nft import INTERVAL, TYPES
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot
from natctl.plan import ALLOW, DNAT, NFT_SETS, Changes, Element, diff, plan

H = Endpoint("198.18.1.2", 27015)


def snap() -> Snapshot:
    return Snapshot("198.18.0.1",
                    (Lobby(1, "a"), Lobby(2, "b", allow=("198.18.0.0/16", "198.19.4.0/24")), Lobby(3, "c", open=True)),
                    (Host(1, H, 29999), Host(2, Endpoint("198.18.1.3", 1), 29998), Host(3, Endpoint("198.18.1.4", 2), 29997)),
                    (Client(1, 1, "udp", Endpoint("198.18.2.2", 40001), 20000),
                     Client(2, 1, "tcp", Endpoint("198.18.2.3", 40002), 20001, host=Endpoint("198.18.7.7", 9)),
                     Client(3, 2, "udp", Endpoint("198.18.2.4", 40003), 20000),
                     Client(4, 1, "udp", Endpoint("198.18.2.5", 40004), 20002, pending=True)),
                    (Forward(8080, Endpoint("198.18.9.9", 80), "both", masquerade=True),))


def as_bytes(elements: frozenset[Element]) -> dict[str, dict[bytes, str]]:
    out: dict[str, dict[bytes, str]] = {}
    for e in elements:
        out.setdefault(e.set, {})[packed.pack(e)] = e.comment
    return out


def test_packed_plan_is_the_plan_in_bytes_and_unpacks_back():
    for sets in (None, NFT_SETS):
        want = plan(snap(), 1.0, sets)
        got = packed.plan(snap(), 1.0, sets)
        assert {k: v for k, v in got.items() if v} == as_bytes(want)
        back = {packed.unpack(name, data, c) for name, m in got.items() for data, c in m.items()}
        assert back == want and {e.comment for e in back} == {e.comment for e in want}


def test_layouts_agree_with_the_netlink_writer():
    lay = nlbatch.layouts()
    for name in TYPES:
        assert packed.LAYOUTS[name].interval == (name in INTERVAL)
        if name not in INTERVAL:
            assert packed.LAYOUTS[name].ksize == lay[name].kp[0].size


def test_packed_diff_is_the_diff_and_the_writer_sends_the_same_bytes():
    want, less = plan(snap(), 1.0, NFT_SETS), plan(snap(), 1.0, NFT_SETS) - {e for e in plan(snap(), 1.0) if e.set == DNAT}
    extra = Element(ALLOW, (1, "198.18.5.0/24"))
    old = less | {extra}
    fast = packed.diff(packed.plan(snap(), 1.0, NFT_SETS), packed.held(old))
    slow = diff(want, old)
    assert set(fast.add) == set(slow.add) and set(fast.delete) == set(slow.delete) and len(fast.add) == len(slow.add)
    lay = nlbatch.layouts()  # the same element bodies (in plan order, not sorted by key)
    for side, add in (("add", True), ("delete", False)):
        fast_bodies = {b for name, (items, c) in getattr(fast, side).groups.items()
                       for b in lay[name].packed(name, items, c, add)}
        assert fast_bodies == {lay[e.set].element(e, add) for e in getattr(slow, side)}
    assert [(k, len(p)) for k, p in nlbatch.messages(fast, "natctl")] == \
        [(k, len(p)) for k, p in nlbatch.messages(slow, "natctl")]
    assert not packed.diff(packed.plan(snap(), 1.0, NFT_SETS), packed.held(want))


def test_a_full_reconcile_on_the_fake_kernel_reads_bytes_and_lands_the_plan():
    fake = FakeKernel()
    fake.apply(Changes(add=tuple(plan(snap(), 1.0, NFT_SETS)), create_table=True))
    installed = fake.read_packed()
    assert installed.packed == {k: set(v) for k, v in as_bytes(plan(snap(), 1.0, NFT_SETS)).items()}
    changes = packed.diff(packed.plan(snap(), 1.0, NFT_SETS), {}, table_ok=False)
    other = FakeKernel()
    other.apply(changes)
    assert other.installed.elements == fake.installed.elements


def test_dump_patterns_lift_key_and_value_from_an_element_as_the_kernel_dumps_it():
    e = Element(DNAT, ("198.18.2.2", "udp", 40001, 29999), ("198.18.1.2", 27015), "lobby a")
    data = packed.pack(e)
    body = nlbatch.layouts()[DNAT].element(e, True)
    # as the kernel dumps it: its nests carry no NLA_F_NESTED
    dumped = body.replace(b"\x01\x80", b"\x01\x00", 1).replace(b"\x02\x80", b"\x02\x00", 1)
    found = nldump.pattern(DNAT).findall(b"\x00" * 8 + dumped + b"\x00" * 8)
    assert [b"".join(f) for f in found] == [data]
