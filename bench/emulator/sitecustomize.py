"""Two fixes to moto's DynamoDB for the benchmark, loaded into moto_server by scripts/bench
(PYTHONPATH=bench/emulator) when BENCH_MOTO_PATCHES is not 0. They change how moto computes,
never what it answers.

1. Isolation. moto serves requests on threads but does not isolate a TransactWriteItems from
   writes that other threads make to the same table meanwhile: it snapshots the table, applies
   the actions, and on a cancellation puts the snapshot back, undoing the other threads' writes;
   and a deletion during the snapshot fails the request with "dictionary changed size during
   iteration" (HTTP 500). DynamoDB is serializable, so every DynamoDB request is handled under
   one lock here. Requests still overlap in flight (the proxy's latency is outside the lock);
   moto could not run two at once anyway (one Python process, one GIL).

2. Cost of transactions. moto 5.2.5 deep-copies the whole table once per action of a transaction (100 copies of
   the table for a transaction of 100), which makes a 100-action transaction on a 1,000-item
   table take about 4 s instead of the tens of milliseconds it takes on AWS. The copy is made
   before any action is applied, so one copy per table is the same snapshot: that is all the
   patch changes.

3. Cost of sending. moto's SendMessage builds every queue attribute to read one
   (ContentBasedDeduplication), and three of them count the queue's messages, so each send costs
   time in proportion to the queue's depth and 1,000 sends cost time in proportion to 1,000^2.
   While a message is being sent, those three counts read 0: they are thrown away unread.
"""

import copy
import sys
import threading

_LOCK = threading.RLock()
_SENDING = threading.local()


def _install():
    try:
        from moto.dynamodb import models
        from moto.dynamodb.models.table import Table
        from moto.dynamodb.responses import DynamoHandler
    except ImportError:
        return  # not the emulator's interpreter

    original_call_action = DynamoHandler.call_action

    def call_action(self):
        with _LOCK:
            return original_call_action(self)

    DynamoHandler.call_action = call_action

    original_transact = models.DynamoDBBackend.transact_write_items
    real_deepcopy = copy.deepcopy

    def transact_write_items(self, transact_items):
        snapshots = {}

        def one_snapshot_per_table(value, memo=None):
            if isinstance(value, Table):
                if id(value) not in snapshots:
                    snapshots[id(value)] = real_deepcopy(value)
                return snapshots[id(value)]
            return real_deepcopy(value, memo)

        with _LOCK:
            models.copy.deepcopy = one_snapshot_per_table
            try:
                return original_transact(self, transact_items)
            finally:
                models.copy.deepcopy = real_deepcopy

    models.DynamoDBBackend.transact_write_items = transact_write_items

    from moto.sqs import models as sqs_models

    original_send = sqs_models.SQSBackend.send_message

    def send_message(self, *args, **kwargs):
        _SENDING.active = True
        try:
            return original_send(self, *args, **kwargs)
        finally:
            _SENDING.active = False

    sqs_models.SQSBackend.send_message = send_message
    for name in (
        "approximate_number_of_messages",
        "approximate_number_of_messages_delayed",
        "approximate_number_of_messages_not_visible",
    ):
        counted = getattr(sqs_models.Queue, name)

        def not_while_sending(queue, counted=counted):
            return 0 if getattr(_SENDING, "active", False) else counted.fget(queue)

        setattr(sqs_models.Queue, name, property(not_while_sending))

    sys.stderr.write(
        "[bench] moto patched: DynamoDB requests serialized, one snapshot per table per transaction, "
        "SendMessage does not count the queue\n"
    )


_install()
