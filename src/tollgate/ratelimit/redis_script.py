"""The Lua script that decides rate limits inside Redis, atomically, in one round trip.

Redis runs a script alone: no other command sees or changes a key between the script's reads
and its writes, so two gateway nodes never both take a key's last unit. The script is each
algorithm of `tollgate.ratelimit.algorithms` again, in Lua, operation for operation, so that
its decisions are the pure algorithms' bit for bit. That holds because

- Lua numbers and Python floats are both IEEE doubles, and `+ - * /` round alike; where Python
  evaluates `a + b - c` left to right, so does the script;
- Python's `x % y` on floats of one sign is C's `fmod`: the script uses `math.fmod`, not Lua's
  `%` (which computes `a - floor(a / b) * b` and rounds differently);
- Python's `int()` truncates towards zero (`trunc` here); `math.ulp` and `math.nextafter`,
  which Lua lacks, are rebuilt from `frexp` and `ldexp`;
- every number crosses the wire as text that reads back as the same double (`repr` from
  Python, parsed with `strtod`), or as the double itself: states and replies are packed
  little-endian doubles (Redis's `struct` library), which also costs Redis far less than
  formatting and parsing text (a `%.17g` is about a microsecond of its CPU, on the core the
  gateway may share with it).

It comes in two forms, of one text: `SCRIPT` for ``EVALSHA``, and `LIBRARY`, a function
library for ``FCALL`` (Redis 7 and later). A script makes every helper and constant again on
every call; a library makes them once, when loaded, and a call runs only its own part: about
1.9 µs less of Redis' CPU per call (10.1 against 12.0 µs for a sliding-window hit under
``redis-benchmark -P 32``).

Call: ``EVALSHA sha <keys> key... op now cost [kind params...]...``, or the same with
``FCALL FUNCTION_NAME`` in place of ``EVALSHA sha``

- `op`: ``h`` hit (decide, and store the new states if every limit admits), ``p`` peek (decide
  a request of cost 1, store nothing), ``r`` release (give `cost` back to the concurrency key
  KEYS[1]);
- `now`: wall seconds, or empty to read the server's clock (``TIME``), so that every node
  judges by one clock;
- per key, its kind's code and parameters (`KIND_CODES`, `PARAMETERS`).

Reply to ``h`` and ``p``: the decision `decide_all` would report, as seven doubles in one bulk
string (``struct.pack('<ddddddd')``): the index of the limit it is about, allowed (1 or 0),
limit, remaining, reset_after, retry_after and delay.

States, one Redis value per key, expiring (PX, PEXPIRE) a second after they count for
nothing:

| kind | type | value |
|---|---|---|
| fixed-window | string | doubles ``start spent window`` |
| quota | string | doubles ``start spent end`` (the period's end: Lua has no time zones) |
| sliding-window | string | doubles ``start previous current window`` |
| sliding-window-log | sorted set | score: time admitted; member ``<running total>:<cost>`` |
| token-bucket | string | doubles ``tokens updated_at`` |
| leaky-bucket | string | doubles ``queued updated_at`` |
| concurrency | string | ``in_flight`` as text |

A value of another size than its kind's (written by another version) counts as no state, but
for windows stored without their length (``start spent``, ``start previous current``), which
are read as they were written. A window's expiry is its end, and changes only when the window
does: a write that keeps the stored window, of the same length, keeps the key's expiry
(``SET ... KEEPTTL``, about 1.3 µs of Redis' CPU less than setting it again).

The log's members are unique (running totals only grow) and their totals zero-padded to 16
digits, so that entries admitted at one instant sort by total, as the Python log's tuples do.
The cost in each member gives `total_before` (the first entry's total less its cost), which
the Python log keeps apart.
"""

from __future__ import annotations

import hashlib
from string import Template
from typing import Final

# The code of each algorithm kind in keys and in the script's arguments.
KIND_CODES: Final = {
    "fixed-window": "f",
    "quota": "q",
    "sliding-window": "s",
    "sliding-window-log": "w",
    "token-bucket": "t",
    "leaky-bucket": "l",
    "concurrency": "c",
}

# The parameters the script takes per kind, in order.
PARAMETERS: Final = {
    "f": ("limit", "window"),
    "q": ("limit", "start", "end", "next_end"),
    "s": ("limit", "window"),
    "w": ("limit", "window"),
    "t": ("burst", "rate"),
    "l": ("rate", "room", "capacity"),
    "c": ("limit", "retry_after"),
}

# A key expires this long after its state counts for nothing: never while it still counts,
# whatever the rounding to milliseconds; a second more of an idle key's memory costs nothing.
EXPIRY_SLACK_MS: Final = 1000

# What a concurrency key holds is freed by releases only, and a node that dies holding slots
# never releases them: a key with no acquire or release for an hour (longer than requests are
# let run) is forgotten, so that what a dead node held comes back.
CONCURRENCY_TTL_MS: Final = 3_600_000

# What is made once: constants, helpers and deciders. A function library (`LIBRARY`) runs
# this when loaded, and its function only the call's part below; a script (`SCRIPT`) runs both
# on every call. Nothing here may call a library (`math`, `string`...) while it is run: Redis
# loads a library with no access to them (hence 1/0, and the literal smallest subnormal).
_DEFINITIONS: Final = Template(
    """
local EPSILON = 1e-9
local INF = 1/0
local SLACK_MS = $slack
local HELD_MS = '$held'
local TINY = 4.9406564584124654e-324  -- math.ldexp(1, -1074)
local COUNTS = {$counts}

-- The call's time and cost, set by each call before anything reads them.
local now, cost

local function fmt(x)
  return string.format('%.17g', x)
end

local function int(x)
  return string.format('%d', x)
end

-- Python's int(): towards zero.
local function trunc(x)
  if x >= 0 then return math.floor(x) end
  return math.ceil(x)
end

-- algorithms._retry_after. Its helpers are made inside it: only a rejection needs them, and
-- every function the main chunk defines is made again on every call of the script.
local function retry_after(moment, admits)
  -- Python's math.ulp, for the numbers met here (finite, or infinite).
  local function ulp(x)
    x = math.abs(x)
    if x == INF then return INF end
    if x == 0 then return TINY end
    local _, exponent = math.frexp(x)
    local spacing = math.ldexp(1, exponent - 53)
    if spacing < TINY then return TINY end
    return spacing
  end
  -- algorithms._seconds_until: moment - now, rounded up (moment >= now).
  local function seconds_until(target)
    local wait = target - now
    while now + wait < target do
      wait = wait + ulp(wait)  -- math.nextafter(wait, inf) for wait >= 0
    end
    return wait
  end
  if moment < now then moment = now end
  local step = 0
  while not admits(moment) do
    step = math.max(2 * step, ulp(moment))
    moment = moment + step
    if moment == INF then return INF end
  end
  return seconds_until(moment)
end

-- Milliseconds a key lives from now: until `expires`, and the slack.
local function ttl(expires)
  local ms = math.ceil((expires - now) * 1000)
  if not (ms > 0) then ms = 0 end
  ms = ms + SLACK_MS
  if ms < 1e14 then return ms end  -- a Lua number goes as %.14g: exact below 1e14
  return int(ms)
end

-- A state's numbers, from the doubles `struct.pack(format)` stored (`size` bytes); nil for
-- no value, or one of another size (a value this script did not write: counted afresh).
local function fields(value, format, size)
  if not value or string.len(value) ~= size then return nil end
  return {struct.unpack(format, value)}
end

-- The new value of a key whose expiry is already right (`same`), or set it to expire with
-- `expires`. Setting an expiry costs Redis a good part of a call (SET ... PX is about 1.3 µs
-- more than SET ... KEEPTTL), and a window's expiry changes only when the window does.
local function store(key, value, same, expires)
  if same then
    redis.call('SET', key, value, 'KEEPTTL')
  else
    redis.call('SET', key, value, 'PX', ttl(expires))
  end
end

-- Fixed windows and quotas: algorithms._PeriodCounter.decide. `extra(start, spent)` is the
-- state to store; `same` whether the key's expiry is that of the stored period, if kept.
local function period(key, state, limit, current, period_end, later, extra, same)
  local start, used = current, 0
  local kept = false
  if state ~= nil and not (state[1] < current) then
    start, used, kept = state[1], state[2], same
  end
  if used + cost <= limit then
    local finish = period_end(start)
    return {true, limit, limit - used - cost, finish - now, 0, 0}, function()
      store(key, extra(start, used + cost), kept, finish)
    end
  end
  local retry = INF
  if cost <= limit then
    retry = retry_after(period_end(start), function(t) return later(t, start) end)
  end
  local reset = 0
  if used ~= 0 then reset = period_end(start) - now end
  return {false, limit, limit - used, reset, retry, 0}
end

-- Each kind's decider, made only when a call needs it: a closure per call of the script
-- costs Redis CPU (every definition of the main chunk is made again on every call).
local function decider(kind)
  if kind == 'f' then return function(key, p)
  local limit, window = p[1], p[2]
  local function period_end(start) return start + window end
  local function later(t, start) return t - math.fmod(t, window) > start end
  local function packed(start, spent) return struct.pack('<ddd', start, spent, window) end
  -- The window's length is stored too (an earlier version's value lacks it): the key's
  -- expiry is the stored window's end only if its length is this one.
  local value = redis.call('GET', key)
  local state = fields(value, '<ddd', 24)
  local same = state ~= nil and state[3] == window
  if state == nil then state = fields(value, '<dd', 16) end
  return period(key, state, limit, now - math.fmod(now, window), period_end, later, packed, same)
  end end

  if kind == 'q' then return function(key, p)
  local limit, current, finish = p[1], p[2], p[3]
  if now >= finish then current, finish = p[3], p[4] end
  local state = fields(redis.call('GET', key), '<ddd', 24)
  local function period_end(start)
    if state ~= nil and start == state[1] then return state[3] end
    return finish
  end
  local function later(t, start) return t >= period_end(start) end
  local function packed(start, spent)
    return struct.pack('<ddd', start, spent, period_end(start))
  end
  -- A kept period's end is the stored one, and its key expires then.
  return period(key, state, limit, current, period_end, later, packed, true)
  end end

-- algorithms.SlidingWindowCounter. An admission makes no closure: most calls are one.
  if kind == 's' then return function(key, p)
  local limit, window = p[1], p[2]
  -- The window's length is stored too (an earlier version's value lacks it), as for fixed
  -- windows.
  local value = redis.call('GET', key)
  local state = fields(value, '<dddd', 32)
  local length = nil
  if state ~= nil then length = state[4] else state = fields(value, '<ddd', 24) end
  -- The window rolled to now (algorithms.SlidingWindowCounter._roll).
  local start, previous, current = now - math.fmod(now, window), 0, 0
  local same = false  -- the stored window is kept, and the key expires with it
  if state ~= nil then
    if state[1] >= start then
      start, previous, current = state[1], state[2], state[3]
      same = length == window
    elseif start - state[1] < 1.5 * window and state[3] ~= 0 then
      previous = state[3]
    end
  end
  local fading = 0
  if previous ~= 0 then
    local elapsed = now - start
    if elapsed <= 0 then
      fading = previous
    else
      fading = previous * (window - elapsed) / window
    end
  end
  local room = limit - current - cost
  if fading <= room then
    local decision = {true, limit, room - math.ceil(fading), start + 2 * window - now, 0, 0}
    return decision, function()
      local packed = struct.pack('<dddd', start, previous, current + cost, window)
      store(key, packed, same, start + 2 * window)
    end
  end
  local retry = INF
  if cost <= limit then
    local function roll(t)
      if state == nil then return nil end
      local begins = t - math.fmod(t, window)
      if state[1] >= begins then return state end
      if begins - state[1] < 1.5 * window then
        if state[3] ~= 0 then return {begins, state[3], 0} end
      end
      return nil
    end
    local function admits(t)
      local rolled = roll(t)
      if rolled == nil then return cost <= limit end
      local faded = 0
      if rolled[2] ~= 0 then
        local elapsed = t - rolled[1]
        if elapsed <= 0 then
          faded = rolled[2]
        else
          faded = rolled[2] * (window - elapsed) / window
        end
      end
      return faded <= limit - rolled[3] - cost
    end
    local moment
    if room >= 0 then
      moment = start + window * (1 - room / previous)
    else
      moment = start + window + window * (1 - (limit - cost) / current)
    end
    retry = retry_after(moment, admits)
  end
  local faded = now
  if current ~= 0 then
    faded = start + 2 * window
  elseif previous ~= 0 then
    faded = start + window
  end
  local remaining = math.max(0, limit - current - math.ceil(fading))
  return {false, limit, remaining, faded - now, retry, 0}
  end end

-- algorithms.SlidingWindowLog, on a sorted set.
  if kind == 'w' then
  local function entry(total, spent)
    return string.format('%016d:%d', total, spent)
  end
  local function total_of(member)
    return tonumber(string.sub(member, 1, 16))
  end
  return function(key, p)
  local limit, window = p[1], p[2]
  local count = redis.call('ZCARD', key)
  if count == 0 then
    if cost <= limit then
      return {true, limit, limit - cost, window, 0, 0}, function()
        redis.call('ZADD', key, fmt(now), entry(cost, cost))
        redis.call('PEXPIRE', key, ttl(now + window))
      end
    end
    return {false, limit, limit, 0, INF, 0}
  end
  -- Entries at or before now - window have left the window.
  local first = redis.call('ZCOUNT', key, '-inf', fmt(now - window))
  local base
  if first > 0 then
    base = total_of(redis.call('ZRANGE', key, int(first - 1), int(first - 1))[1])
  else
    local oldest = redis.call('ZRANGE', key, 0, 0)[1]
    base = total_of(oldest) - tonumber(string.sub(oldest, 18))
  end
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local total, newest_at = total_of(newest[1]), tonumber(newest[2])
  local used = total - base
  if used + cost <= limit then
    local stamp = newest_at
    if now > newest_at then stamp = now end
    return {true, limit, limit - used - cost, stamp + window - now, 0, 0}, function()
      if first > 0 then redis.call('ZREMRANGEBYRANK', key, 0, int(first - 1)) end
      redis.call('ZADD', key, fmt(stamp), entry(total + cost, cost))
      redis.call('PEXPIRE', key, ttl(stamp + window))
    end
  end
  local retry = INF
  if cost <= limit then
    -- The oldest entries must leave until `cost` fits: bisect for the last to go.
    local target = base + used + cost - limit
    local low, high = first, count
    while low < high do
      local middle = math.floor((low + high) / 2)
      if total_of(redis.call('ZRANGE', key, int(middle), int(middle))[1]) < target then
        low = middle + 1
      else
        high = middle
      end
    end
    local leaving = tonumber(redis.call('ZRANGE', key, int(low), int(low), 'WITHSCORES')[2])
    retry = retry_after(leaving + window, function(t) return leaving <= t - window end)
  end
  local reset = 0
  if used ~= 0 then reset = newest_at + window - now end
  return {false, limit, limit - used, reset, retry, 0}
  end end

-- algorithms.TokenBucket
  if kind == 't' then return function(key, p)
  local burst, rate = p[1], p[2]
  local capacity = burst
  local state = fields(redis.call('GET', key), '<dd', 16)
  local function tokens_at(t)
    local elapsed = t - state[2]
    if elapsed <= 0 then return state[1] end
    local tokens = state[1] + elapsed * rate
    if tokens < capacity then return tokens end
    return capacity
  end
  local tokens, updated_at = capacity, now
  if state ~= nil then
    tokens = tokens_at(now)
    if not (now > state[2]) then updated_at = state[2] end
  end
  if tokens + EPSILON >= cost then
    local left = tokens - cost
    local reset = updated_at + (capacity - left) / rate - now
    return {true, burst, trunc(left + EPSILON), reset, 0, 0}, function()
      local value = struct.pack('<dd', left, updated_at)
      redis.call('SET', key, value, 'PX', ttl(updated_at + (capacity - left) / rate))
    end
  end
  local retry = INF
  if cost <= burst and state ~= nil then
    local moment = state[2] + (cost - EPSILON - state[1]) / rate
    retry = retry_after(moment, function(t) return tokens_at(t) + EPSILON >= cost end)
  end
  local reset = updated_at + (capacity - tokens) / rate - now
  return {false, burst, trunc(tokens + EPSILON), reset, retry, 0}
  end end

-- algorithms.LeakyBucket: `room` is its `_room`, `capacity` its `capacity`.
  if kind == 'l' then return function(key, p)
  local rate, room_at_most, capacity = p[1], p[2], p[3]
  local state = fields(redis.call('GET', key), '<dd', 16)
  local function queued_at(t)
    local elapsed = t - state[2]
    if elapsed <= 0 then return state[1] end
    local queued = state[1] - elapsed * rate
    if queued > 0 then return queued end
    return 0
  end
  local queued, updated_at = 0, now
  if state ~= nil then
    queued = queued_at(now)
    if not (now > state[2]) then updated_at = state[2] end
  end
  local room = room_at_most - queued
  if room >= cost - 1 then
    local after = queued + cost
    local room_after = room_at_most - after
    local remaining = 0
    if room_after >= 0 then remaining = trunc(room_after) + 1 end
    local reset = updated_at - now + after / rate
    return {true, capacity, remaining, reset, 0, queued / rate}, function()
      local value = struct.pack('<dd', after, updated_at)
      redis.call('SET', key, value, 'PX', ttl(updated_at + after / rate))
    end
  end
  local retry = INF
  if cost <= capacity and state ~= nil then
    local moment = state[2] + (state[1] - room_at_most + cost - 1) / rate
    retry = retry_after(moment, function(t) return room_at_most - queued_at(t) >= cost - 1 end)
  end
  local remaining = 0
  if room >= 0 then remaining = trunc(room) + 1 end
  return {false, capacity, remaining, updated_at - now + queued / rate, retry, 0}
  end end

-- algorithms.Concurrency
  if kind == 'c' then return function(key, p)
  local limit, hint = p[1], p[2]
  local in_flight = tonumber(redis.call('GET', key)) or 0
  if in_flight + cost <= limit then
    return {true, limit, limit - in_flight - cost, hint, 0, 0}, function()
      redis.call('SET', key, fmt(in_flight + cost), 'PX', HELD_MS)
    end
  end
  local retry = hint
  if cost > limit then retry = INF end
  local reset = 0
  if in_flight ~= 0 then reset = hint end
  return {false, limit, limit - in_flight, reset, retry, 0}
  end end
end

"""
).substitute(
    slack=EXPIRY_SLACK_MS,
    held=CONCURRENCY_TTL_MS,
    counts=", ".join(f"{code} = {len(names)}" for code, names in PARAMETERS.items()),
)

# One call: what `KEYS` and `ARGV` ask.
_CALL: Final = """
local op = ARGV[1]
if ARGV[2] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
cost = tonumber(ARGV[3])

if op == 'r' then
  local left = (tonumber(redis.call('GET', KEYS[1])) or 0) - cost
  if left > 0 then
    redis.call('SET', KEYS[1], fmt(left), 'PX', HELD_MS)
  else
    redis.call('DEL', KEYS[1])
  end
  return 0
end

local decisions, writes = {}, {}
local admitted = true
local at = 4
for index, key in ipairs(KEYS) do
  local kind = ARGV[at]
  local count = COUNTS[kind]
  local parameters = {}
  for offset = 1, count do
    parameters[offset] = tonumber(ARGV[at + offset])
  end
  at = at + count + 1
  local decision, write = decider(kind)(key, parameters)
  decisions[index], writes[index] = decision, write
  if not decision[1] then admitted = false end
end
if op == 'h' and admitted then
  for index = 1, #KEYS do writes[index]() end
end
if #KEYS == 1 then  -- one limit: its decision is the one to report, as chosen below
  local only = decisions[1]
  local allowed = 0
  if only[1] then allowed = 1 end
  return struct.pack('<ddddddd', 0, allowed, only[2], only[3], only[4], only[5], only[6])
end
-- The decision to report: algorithms.decide_all's choice. Among the rejecting limits if any
-- (else among all), the lowest remaining, then the longest retry_after, then the longest
-- reset_after; a rejection reports the longest retry_after of all, an admission the longest
-- delay.
local chosen, chosen_index = nil, 0
local rejected = false
local longest_retry, longest_delay = 0, 0
for index, decision in ipairs(decisions) do
  local consider = true
  if decision[1] then
    longest_delay = math.max(longest_delay, decision[6])
    if rejected then consider = false end
  else
    longest_retry = math.max(longest_retry, decision[5])
    if not rejected then
      rejected = true
      chosen = nil
    end
  end
  if consider then
    if chosen == nil
      or decision[3] < chosen[3]
      or (decision[3] == chosen[3] and (decision[5] > chosen[5]
        or (decision[5] == chosen[5] and decision[4] > chosen[4]))) then
      chosen, chosen_index = decision, index
    end
  end
end
local retry, delay = chosen[5], chosen[6]
if rejected then retry = longest_retry else delay = longest_delay end
local allowed = 0
if chosen[1] then allowed = 1 end
return struct.pack(
  '<ddddddd', chosen_index - 1, allowed, chosen[2], chosen[3], chosen[4], retry, delay)
"""

SCRIPT: Final = (_DEFINITIONS + _CALL).encode()
"""The script for ``EVAL``/``EVALSHA``: everything, made again on every call."""

SCRIPT_SHA: Final = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest()
"""What EVALSHA names the script by (Redis' own digest of its text)."""

FUNCTION_NAME: Final = f"tollgate_{SCRIPT_SHA[:16]}"
"""The library's name and its one function's: the script's digest in it, so that gateways of
two versions sharing one Redis each call their own."""

LIBRARY: Final = (
    f"#!lua name={FUNCTION_NAME}\n{_DEFINITIONS}\n"
    f"redis.register_function('{FUNCTION_NAME}', function(KEYS, ARGV)\n{_CALL}end)\n"
).encode()
"""The same as a function library (Redis 7 and later, ``FUNCTION LOAD``): its definitions are
made once, when it is loaded, and ``FCALL`` runs only the call's part."""
