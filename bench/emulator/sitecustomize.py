"""Fixes to moto's DynamoDB (and SQS) for the benchmark, loaded into moto_server by scripts/bench
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

4. Cost of holding many items (the run history benchmark, scripts/bench-history). moto checks an
   item's size again after each attribute it adds (O(attributes^2) per write); it answers every
   Query by sorting every item of the table, then walking the whole partition (a base-table
   Query) or every item (an index Query). The patches below keep each partition's sort keys in
   order (rebuilt after a bulk load, kept up to date by bisection after a few writes), give
   moto's own Query code only the items that can matter, and sort an index's items by their
   string values when every key is a string. What they leave out is, by construction, what moto
   would have walked past without changing its answer; scripts/check_moto_patches.py compares
   the answers with and without them. See _install_history() for the exact conditions.
   BENCH_MOTO_HISTORY_PATCHES=0 leaves this one out. scripts/test loads all of them too.
"""

import bisect
import copy
import os
import sys
import threading
from collections import defaultdict

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


# moto refuses an item bigger than this when it is written (LimitedSizeDict); Item.size() uses
# the same sum. UpdateItem changes items in place, so an update leaving an item bigger than this
# turns the Query shortcut off for its table (see _install_history).
_MAX_ITEM_SIZE = 405_000
# Pending inserts into a sorted partition before its order is rebuilt instead of patched.
_MAX_PENDING = 64


class _Partition(dict):
    """One partition of a table with a range key: {range key: Item}, as moto keeps it, plus the
    range keys in moto's sort order when they are all strings (built when first asked for)."""

    def _pp_init(self):
        self._pp_keys = None  # sorted str values of the range keys, or None: not built
        self._pp_objs = None  # the DynamoType keys, in the same order
        self._pp_pending = []

    def __init__(self, *args, **kwargs):
        self._pp_init()
        super().__init__(*args, **kwargs)

    def _pp_added(self, key):
        if self._pp_keys is not None:
            self._pp_pending.append(key)
            if len(self._pp_pending) > _MAX_PENDING:
                self._pp_keys = self._pp_objs = None
                self._pp_pending = []

    def _pp_forget(self):
        self._pp_keys = self._pp_objs = None
        self._pp_pending = []

    def __setitem__(self, key, value):
        if key not in self:
            self._pp_added(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._pp_forget()

    def pop(self, *args):
        self._pp_forget()
        return super().pop(*args)

    def popitem(self):
        self._pp_forget()
        return super().popitem()

    def clear(self):
        self._pp_forget()
        super().clear()

    def update(self, *args, **kwargs):
        self._pp_forget()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self._pp_added(key)
        return super().setdefault(key, default)

    def __ior__(self, other):
        self._pp_forget()
        return super().__ior__(other)

    def __copy__(self):
        return _Partition(self)

    def __deepcopy__(self, memo):
        result = _Partition()
        memo[id(self)] = result
        for key, value in self.items():
            dict.__setitem__(result, copy.deepcopy(key, memo), copy.deepcopy(value, memo))
        return result

    def __reduce__(self):
        return (_Partition, (dict(self),))

    def sorted_string_keys(self):
        """(sorted str values, DynamoType keys in that order), or None when a key is not a
        string. moto orders a partition by DynamoType.__lt__, which for strings is str <."""
        if self._pp_keys is None:
            objs = list(self.keys())
            if any(getattr(k, "type", None) != "S" or type(k.value) is not str for k in objs):
                return None
            objs.sort(key=lambda k: k.value)
            self._pp_objs = objs
            self._pp_keys = [k.value for k in objs]
            self._pp_pending = []
        elif self._pp_pending:
            pending, self._pp_pending = self._pp_pending, []
            for k in pending:
                if getattr(k, "type", None) != "S" or type(k.value) is not str:
                    self._pp_forget()
                    return self.sorted_string_keys()
                if k in self:
                    at = bisect.bisect_left(self._pp_keys, k.value)
                    if at < len(self._pp_keys) and self._pp_keys[at] == k.value:
                        continue  # already there (removed and added again)
                    self._pp_keys.insert(at, k.value)
                    self._pp_objs.insert(at, k)
        return self._pp_keys, self._pp_objs


def _window(keys, comparison, values):
    """[lo, hi) of the sorted str keys that satisfy a key condition, or None if unsupported."""
    n = len(keys)
    if comparison is None:
        return 0, n
    if any(getattr(v, "type", None) != "S" or type(v.value) is not str for v in values):
        return None
    vals = [v.value for v in values]
    if comparison == "=" and len(vals) == 1:
        return bisect.bisect_left(keys, vals[0]), bisect.bisect_right(keys, vals[0])
    if comparison == "<" and len(vals) == 1:
        return 0, bisect.bisect_left(keys, vals[0])
    if comparison == "<=" and len(vals) == 1:
        return 0, bisect.bisect_right(keys, vals[0])
    if comparison == ">" and len(vals) == 1:
        return bisect.bisect_right(keys, vals[0]), n
    if comparison == ">=" and len(vals) == 1:
        return bisect.bisect_left(keys, vals[0]), n
    if comparison == "BETWEEN" and len(vals) == 2:
        lo = bisect.bisect_left(keys, vals[0])
        return lo, max(lo, bisect.bisect_right(keys, vals[1]))
    if comparison == "BEGINS_WITH" and len(vals) == 1:
        lo = hi = bisect.bisect_left(keys, vals[0])
        while hi < n and keys[hi].startswith(vals[0]):
            hi += 1
        return lo, hi
    return None


def _install_history():
    try:
        from moto.dynamodb import models
        from moto.dynamodb.comparisons import get_comparison_func
        from moto.dynamodb.models import dynamo_type
        from moto.dynamodb.models.dynamo_type import DynamoType, Item, LimitedSizeDict
        from moto.dynamodb.models.table import RESULT_SIZE_LIMIT, Table
        from moto.dynamodb.models.utilities import bytesize
    except ImportError:
        return

    # (a) Item.__init__ without the O(n^2) size check: LimitedSizeDict checks the running total
    # of (key bytes + value size) after each attribute; sizes are never negative, so checking the
    # running total here, in the same order, raises the same ItemSizeTooLarge at the same point.
    def item_init(self, hash_key, range_key, attrs):
        self.hash_key = hash_key
        self.range_key = range_key
        limited = LimitedSizeDict.__new__(LimitedSizeDict)
        dict.__init__(limited)
        total = 0
        for key, value in attrs.items():
            value = DynamoType(value)
            total += (key.size() if type(key) is DynamoType else bytesize(str(key))) + value.size()
            if total > _MAX_ITEM_SIZE:
                raise dynamo_type.ItemSizeTooLarge
            dict.__setitem__(limited, key, value)
        self.attrs = limited

    Item.__init__ = item_init

    # (b) Partitions that know their order.
    original_table_init = Table.__init__

    def table_init(self, *args, **kwargs):
        original_table_init(self, *args, **kwargs)
        if self.range_key_attr is not None and not any(self.items.values()):
            self.items = defaultdict(_Partition)

    Table.__init__ = table_init

    # (c) An update that leaves an item above moto's write limit turns the shortcut off for its
    # table: the shortcut relies on no item being bigger than that.
    original_update_item = models.DynamoDBBackend.update_item

    def update_item(self, table_name, *args, **kwargs):
        item = original_update_item(self, table_name, *args, **kwargs)
        if item is not None and item.size() > _MAX_ITEM_SIZE:
            self.get_table(table_name).pp_oversized = True
        return item

    models.DynamoDBBackend.update_item = update_item

    original_query = Table.query
    original_sorted_items = Table.sorted_items

    def fast_sorted_items(self, hash_key_attrs, range_key_attrs, items):
        # DynamoType compares strings as str does (== on type and value, < on value): the same
        # keys in the same order, so the same stable sort.
        attrs = self._generate_attr_to_sort_by(hash_key_attrs, range_key_attrs)
        for item in items:
            for attr in attrs:
                value = item.attrs.get(attr)
                if value is None or value.type != "S" or type(value.value) is not str:
                    return original_sorted_items(self, hash_key_attrs, range_key_attrs, items)
        items.sort(key=lambda x: tuple([x.attrs[a].value for a in attrs]))
        return items

    def base_candidates(self, hash_key, range_comparison, range_objs, limit):
        """The items of the partition moto's walk can be affected by: those that satisfy the
        sort-key condition, and the one on either side of them. Any other item of the partition
        fails the condition and lies before them (where nothing has been added yet, so only an
        item over 1 MB could stop the walk) or after the one following them (where the walk has
        either stopped already, or only an item bigger than what is left of the 1 MB could stop
        it; checked below)."""
        if hash_key is None or getattr(self, "pp_oversized", False):
            return None
        if limit is not None and (type(limit) is not int or limit < 1):
            return None
        partition = dict.get(self.items, hash_key)
        if partition is None:
            return []
        if not isinstance(partition, _Partition):
            return None
        ordered = partition.sorted_string_keys()
        if ordered is None:
            return None
        keys, objs = ordered
        window = _window(keys, range_comparison, range_objs)
        if window is None:
            return None
        lo, hi = window
        inside = [partition[k] for k in objs[lo:hi]]
        if range_comparison is not None:
            compare = get_comparison_func(range_comparison)
            values = [v.value for v in range_objs]
            # The window must be exactly the items moto's comparison accepts (it is, for strings).
            if not all(compare(item.range_key.value, *values) for item in inside):
                return None
            for edge in (lo - 1, hi):
                if 0 <= edge < len(objs) and compare(objs[edge].value, *values):
                    return None
            if sum(item.size() for item in inside) + _MAX_ITEM_SIZE > RESULT_SIZE_LIMIT:
                return None
        before = [partition[objs[lo - 1]]] if lo > 0 else []
        after = [partition[objs[hi]]] if hi < len(objs) else []
        return before + inside + after

    def index_candidates(self, index_name, hash_key_conditions, range_key_conditions):
        """The items of the table that moto's index walk keeps: those with every hash key of
        the index equal to the query's (strings only, else None: moto's own walk)."""
        if not hash_key_conditions or (range_key_conditions and len(range_key_conditions) > 1):
            return None
        wanted = []
        for name, value in hash_key_conditions:
            if getattr(value, "type", None) != "S" or type(value.value) is not str:
                return None
            wanted.append((name, value.value))
        found = []
        for partition in self.items.values():
            for item in partition.values() if self.range_key_attr else (partition,):
                attrs = item.attrs
                for name, text in wanted:
                    value = attrs.get(name)
                    # moto: `not value or value != expected`; a DynamoType is always truthy and
                    # equals a string only when it is that string.
                    if value is None or value.type != "S" or value.value != text:
                        break
                else:
                    found.append(item)
        return found

    def query(self, hash_key, range_comparison, range_objs, limit, exclusive_start_key,
              scan_index_forward, projection_expressions, index_name=None, consistent_read=False,
              filter_expression=None, hash_key_conditions=None, range_key_conditions=None,
              **filter_kwargs):
        args = (hash_key, range_comparison, range_objs, limit, exclusive_start_key,
                scan_index_forward, projection_expressions, index_name, consistent_read,
                filter_expression)
        kwargs = dict(hash_key_conditions=hash_key_conditions,
                      range_key_conditions=range_key_conditions, **filter_kwargs)
        candidates = None
        if not filter_kwargs:
            if index_name:
                if index_name in {i.name for i in self.all_indexes()}:
                    candidates = index_candidates(self, index_name, hash_key_conditions,
                                                  range_key_conditions)
            elif not range_key_conditions or len(range_key_conditions) == 1:
                candidates = base_candidates(self, hash_key, range_comparison, range_objs, limit)
        if candidates is None:
            return original_query(self, *args, **kwargs)
        # moto's own Query, over the candidates only (it filters, sorts and pages them itself).
        self.all_items = lambda: list(candidates)
        self.sorted_items = lambda h, r, items: fast_sorted_items(self, h, r, items)
        try:
            return original_query(self, *args, **kwargs)
        finally:
            del self.all_items
            del self.sorted_items

    Table.query = query
    sys.stderr.write("[bench] moto patched for history: indexed partitions, Query over candidates\n")


_install()
if os.environ.get("BENCH_MOTO_HISTORY_PATCHES", "1") != "0":
    _install_history()
