"""Game masters behind one public IP (see "Game masters on one IP" in the README).

Each GM gets a fixed address inside a VPN that natctl manages (WireGuard, or
OpenVPN through ccd files) and a public port P. A session is a static forward
public:P -> gm_address:1802 with a TTL, owned by ``gm:NAME``, so sessions end
through the same cleanup as every other forward.
"""
