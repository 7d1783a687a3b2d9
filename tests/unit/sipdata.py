"""Sample messages shared by the unit tests."""

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=f1\r\n'
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: c1@192.0.2.10\r\n"
    b"CSeq: 10 REGISTER\r\n"
    b'Contact: <sip:alice@192.0.2.10:5062;transport=udp>;+sip.instance="<urn:uuid:1111>";expires=1800\r\n'
    b"User-Agent: Foo/1.0\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)

INVITE = (
    b"INVITE sip:alice@10.0.0.2:5060;ctid=42 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-inv1\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:bob@example.com>;tag=b1\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: call1@10.0.0.3\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:bob@10.0.0.3:5070>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\n"
    b"v=0\n"
)
