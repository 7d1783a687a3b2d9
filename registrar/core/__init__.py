"""The mid-registrar's SIP rules over the sans-IO stack, split by job as OpenSIPS splits save, lookup and
timer.

``service.MidRegistrar`` takes the stack's events and the store's callbacks and hands each to the part
for that job; the parts share one ``state.CoreState``:

- ``registration``: REGISTERs from phones and the main registrar's answers (behaviour §3–§7), with the
  rules in ``register`` (validation, relayed request, 2xx), ``reply`` (what the phone is answered, §3.5),
  ``throttle`` (absorb or relay, §5.2, §6), ``policy`` (AoR and lifetimes, §3.2, §3.3), ``gruu`` (§8.6)
  and ``gate`` (what an absorbed REGISTER must pass, §11);
- ``routing``: requests from the main registrar to the phones and hand-off to the process holding the
  flow (§8.4, §8.5, §9), with the rules in ``lookup``;
- ``expiry``: the expiry timer and generated De-REGISTERs (§5.4, §6.4), built by ``deregister`` and
  answered to a challenge with ``digest`` (T57).
"""
