--[[ admit.lua: check every limit of one admission and, only if all enforced ones pass, reserve
the request on every counter (all-or-nothing, atomic because a script runs alone).

Time is ARGV `now` (the proxy's clock), never redis TIME: windows, lease expiries and tests all run
on the caller's clock. Key TTLs (housekeeping only) run on Redis's own clock.

KEYS[1]       the reservation record (settle deletes it, which makes settling idempotent)
KEYS[2..n+1]  the n distinct counters, all carrying the admission's hash tag
ARGV[1]  now           unix seconds, may be fractional
ARGV[2]  request_id    the lease member
ARGV[3]  record_ttl    seconds
ARGV[4]  lease_expiry  unix seconds (now + lease_seconds)
ARGV[5]  n             counters
ARGV[6]  m             limits
then n triples, one per counter:  kind ("w" window | "p" period | "l" leases), amount, ttl seconds
then m triples, one per limit:    counter index (1-based), value, enforce ("1" | "0")

Counters: "w" a hash of one-second buckets (field = unix second, value = amount, always > 0)
summed over the 60 buckets [floor(now)-59, ...], with two more fields: 't', the sum of every
bucket in the hash, and 'o', the oldest bucket's second (record.lua drops 'o' when it drops
that bucket). So an admission reads those two and drops only the seconds that left the window,
instead of summing every bucket each time; a window without them (new, written by an older
version, or whose 'o' record.lua dropped) is summed once in full. (record.lua from before
2026-11-29, still run by proxies not yet upgraded in a rolling deploy, can leave 'o' naming a
dropped bucket; that only makes a reset time early, until 'o' leaves the window.) "p" a plain
integer; "l" a sorted set request_id -> expiry whose expired members are dropped here.

Idempotent per request_id: if the reservation record already exists, this is a client retry of
an admission that went through (a reply lost to a timeout), so nothing is checked or written
again and `replayed` is 1.

Returns {admitted (1|0), used, oldest, free_at, replayed (1|0)}:
  used[i]     counter i before this admission (after it, when replayed)
  oldest[i]   "w": the oldest bucket second in the window, -1 if none; else -1
  free_at[j]  for a failing "w" limit j: the bucket second whose expiry frees enough room for
              this request, -1 if it never can; else -1
]]

local now = tonumber(ARGV[1])
local second = math.floor(now)
local low = second - 59
local n = tonumber(ARGV[5])
local m = tonumber(ARGV[6])
local sec_field = string.format('%d', second)

-- Seconds of probing (from 'o' up to the window's start, or ahead of it for the oldest live
-- bucket) past which one full pass is cheaper. A window holds at most one bucket per second, so a
-- full pass reads as many fields as there are live buckets, while each probe is a field lookup of
-- its own: probing pays only while a subject's traffic is dense (a bucket every second, 'o' one
-- second behind). A subject seen every few seconds has few buckets and wide gaps: a full pass.
local PROBE_MAX = 8

-- A window's live buckets {second, amount}, oldest first: what frees room, and when.
local function live_sorted(key)
  local flat, live = redis.call('HGETALL', key), {}
  for f = 1, #flat, 2 do
    local s = tonumber(flat[f])  -- nil for 't' and 'o'
    if s and s >= low then live[#live + 1] = {s, tonumber(flat[f + 1])} end
  end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  return live
end

-- A window summed in full: drops what left it, sets 't' and 'o'. Returns (used, oldest or -1).
local function window_full(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return 0, -1 end  -- no such key
  local stale, total, first = {}, 0, -1
  for f = 1, #flat, 2 do
    local s = tonumber(flat[f])
    if s and s < low then
      stale[#stale + 1] = flat[f]
    elseif s then
      total = total + tonumber(flat[f + 1])
      if first < 0 or s < first then first = s end
    end
  end
  if first < 0 then
    -- Nothing live (a subject back after a quiet minute): the key goes, and the write below makes
    -- it again in one HSET.
    redis.call('DEL', key)
    return 0, -1
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  redis.call('HSET', key, 't', total, 'o', first)
  return total, first
end

-- A window from its running total: drops the seconds from 'o' to the window's start, then finds
-- the oldest live bucket ('o' itself while traffic is steady). Returns (used, oldest or -1).
local function window_view(key)
  local meta = redis.call('HMGET', key, 't', 'o')
  local total, o = tonumber(meta[1]), tonumber(meta[2])
  if total == nil or o == nil or low - o > PROBE_MAX then
    return window_full(key)
  end
  local moved = false  -- 'o' or 't' to write back
  if o < low then
    moved = true
    local fields = {}
    for s = o, low - 1 do fields[#fields + 1] = tostring(s) end
    local values, gone = redis.call('HMGET', key, unpack(fields)), {}
    for k = 1, #fields do
      if values[k] then
        total = total - tonumber(values[k])
        gone[#gone + 1] = fields[k]
      end
    end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
    o = low
  end
  if total <= 0 then
    redis.call('HDEL', key, 't', 'o')
    return 0, -1
  end
  -- 'o' names a live bucket (settle drops 'o' with the bucket it names); one moved up to the
  -- window's start is only a bound, so look for the bucket there.
  if moved and redis.call('HEXISTS', key, tostring(o)) == 0 then
    local fields = {}
    for s = o + 1, o + PROBE_MAX do fields[#fields + 1] = tostring(s) end
    local values, found = redis.call('HMGET', key, unpack(fields)), nil
    for k = 1, #fields do
      if values[k] then found = o + k; break end
    end
    if found == nil then return window_full(key) end  -- buckets further ahead than that: sum in full
    o, moved = found, true
  end
  if moved then redis.call('HSET', key, 't', total, 'o', o) end
  return total, o
end

local kinds, amounts, ttls = {}, {}, {}
local used, oldest = {}, {}
for i = 1, n do
  local a = 6 + (i - 1) * 3
  kinds[i], amounts[i], ttls[i] = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local key = KEYS[i + 1]
  local total, first = 0, -1
  if kinds[i] == 'w' then
    total, first = window_view(key)
  elseif kinds[i] == 'p' then
    total = tonumber(redis.call('GET', key) or '0')
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    total = redis.call('ZCARD', key)
  end
  used[i], oldest[i] = total, first
end

-- The record is made here (one call for the check and the write); a refusal below drops it again.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  local none = {}
  for j = 1, m do none[j] = -1 end
  return {1, used, oldest, none, 1}
end

local admitted = 1
local free_at = {}
for j = 1, m do
  local a = 6 + n * 3 + (j - 1) * 3
  local i, value, enforce = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local amount = tonumber(amounts[i])
  free_at[j] = -1
  if used[i] + amount > value then
    if enforce == '1' then admitted = 0 end
    if kinds[i] == 'w' and amount <= value then
      local need, freed = used[i] + amount - value, 0
      for _, b in ipairs(live_sorted(KEYS[i + 1])) do
        freed = freed + b[2]
        if freed >= need then free_at[j] = b[1]; break end
      end
    end
  end
end

if admitted == 1 then
  for i = 1, n do
    local key, amount = KEYS[i + 1], amounts[i]
    if kinds[i] == 'l' then
      redis.call('ZADD', key, ARGV[4], ARGV[2])
      if redis.call('TTL', key) < ttls[i] then redis.call('EXPIRE', key, ttls[i]) end
    elseif tonumber(amount) ~= 0 then
      if kinds[i] == 'w' then
        -- The key outlives its newest bucket: its TTL is set when a second's bucket is made, not
        -- again by every request of that second (the TTL's margin covers proxies whose clocks
        -- disagree, writing into a bucket another one made).
        if oldest[i] < 0 then
          -- An empty window (no key, or the view above emptied it): its bucket, total and oldest
          -- second in one write.
          redis.call('HSET', key, sec_field, amount, 't', amount, 'o', sec_field)
          redis.call('EXPIRE', key, ttls[i])
        else
          if redis.call('HINCRBY', key, sec_field, amount) == tonumber(amount) then
            redis.call('EXPIRE', key, ttls[i])
          end
          redis.call('HINCRBY', key, 't', amount)
          if second < oldest[i] then redis.call('HSET', key, 'o', sec_field) end
        end
      else
        redis.call('INCRBY', key, amount)
        redis.call('EXPIRE', key, ttls[i])
      end
    end
  end
else
  redis.call('DEL', KEYS[1])
end

return {admitted, used, oldest, free_at, 0}
