"""``horovodrun`` with one fix for elastic jobs: a host-update notice no longer holds up recovery.

    python -m fa_hvd.horovodrun ARGS      (horovodrun's own arguments; launch/elastic.sh uses it)

Horovod 0.28.1's elastic driver tells the coordinator (rank 0) of every change in the
discovered hosts from its discovery thread, holding the lock that the re-forming of the
world waits for (``ElasticDriver._discover_hosts`` -> ``_notify_workers_host_changes`` in
``horovod/runner/elastic/driver.py``, under ``_wait_hosts_cond``; ``resume()`` ->
``wait_for_available_slots`` takes the same lock). The notice
(``WorkerNotificationClient.notify_hosts_updated``) connects with no timeout, three times
(``BasicClient._send_one``, ``horovod/runner/common/util/network.py``). When rank 0's node
is cut off, each try lasts until the kernel gives up on the connection (a failed ARP: about a
minute on the test cluster; behind a router, ``tcp_syn_retries``: about two minutes each),
and the survivors, their world re-formed by Gloo's timeout, wait for it in their rendezvous.

Here the notice goes out from a thread of its own and the driver waits for it at most
:data:`NOTICE_WAIT_S`: a rank 0 alive takes it in milliseconds, as before; one that does not
answer is lost with its node (the survivors re-form the world without it), and the notice
goes on trying in the background. Nothing else of horovodrun changes.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading

from horovod.runner.elastic.worker import WorkerNotificationClient
from horovod.runner.launch import run_commandline

NOTICE_WAIT_S = 5.0


def bounded(notify):
    """``notify(client, timestamp, update)`` in a thread; its error, or a warning after :data:`NOTICE_WAIT_S`."""

    @functools.wraps(notify)
    def notify_hosts_updated(client, timestamp, update_res):
        failed: list[Exception] = []

        def send():
            try:
                notify(client, timestamp, update_res)
            except Exception as exc:  # noqa: BLE001 -- handed to the caller: Horovod's driver logs it
                failed.append(exc)

        thread = threading.Thread(target=send, name="fa_hvd-hosts-notice", daemon=True)
        thread.start()
        thread.join(NOTICE_WAIT_S)
        if thread.is_alive():
            where = ", ".join(f"{host}:{port}" for addrs in client.addresses().values() for host, port in addrs)
            logging.warning("fa_hvd: rank 0 (%s) did not take the host update within %g s; going on without "
                            "waiting for it (its node is unreachable, or it is busy)", where, NOTICE_WAIT_S)
        elif failed:
            raise failed[0]

    return notify_hosts_updated


def main() -> None:
    WorkerNotificationClient.notify_hosts_updated = bounded(WorkerNotificationClient.notify_hosts_updated)
    sys.argv[0] = "horovodrun"
    run_commandline()


if __name__ == "__main__":
    main()
