--[[ record.lua: one finished request, once: settle its reservation (if it had one) and add its
usage to the aggregate hash of its (day, user, team), in one atomic call. It is also the plain
settle (seen_ttl 0, no aggregate fields), so settling lives in one script.

Exactly-once per event id: the seen marker is set first (SET NX); if it already exists the event
was recorded before (a replay after a lost reply or a store outage) and nothing changes. Settling
deletes the reservation record first and adjusts counters only if it still existed (once), in
the buckets and periods the reservation was counted in, never below 0.

KEYS[1]        the event's seen marker
KEYS[2]        the reservation record (may be absent: a refused request has none)
KEYS[3]        the aggregate hash of (day, user, team)
KEYS[4..n+3]   the reservation's n distinct counters (n = 0 without a reservation)
All keys carry the admission's hash tag.
ARGV[1]  now          unix seconds (the proxy's clock)
ARGV[2]  request_id   the lease member to release
ARGV[3]  seen_ttl     seconds; 0: no seen marker (a plain settle; KEYS[1] is not touched)
ARGV[4]  agg_ttl      seconds
ARGV[5]  n            counters
ARGV[6]  f            aggregate fields (0: KEYS[3] is not touched)
then n quadruples, one per counter: kind ("w" | "p" | "l"), delta (actual - reserved), bucket
  second (the admission's floor(now), used by "w"), ttl seconds
then f pairs: field ("measure|model"), increment; the first is the event's requests field

Returns {recorded (1 | 0 if seen before), settled (1 | 0), created (1 if this made the aggregate
hash: the caller makes sure the day's index lists it)}.
]]

if tonumber(ARGV[3]) > 0 and not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return {0, 0, 0}
end

local n = tonumber(ARGV[5])
local f = tonumber(ARGV[6])
local settled = 0
if redis.call('DEL', KEYS[2]) == 1 then
  settled = 1
  local low = math.floor(tonumber(ARGV[1])) - 59
  for i = 1, n do
    local a = 6 + (i - 1) * 4
    local kind, delta, bucket, ttl = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
    local key = KEYS[i + 3]
    if kind == 'l' then
      redis.call('ZREM', key, ARGV[2])
    elseif delta ~= 0 then
      if kind == 'w' then
        if tonumber(bucket) >= low then
          -- A window keeps 't' (the sum of its buckets) and 'o' (no bucket older): see admit.lua.
          local meta = redis.call('HMGET', key, 't', 'o')
          local v = redis.call('HINCRBY', key, bucket, ARGV[a + 2])
          local change = delta
          if v <= 0 then
            redis.call('HDEL', key, bucket)
            change = delta - v  -- the bucket left whole
            -- 'o' named it: admit.lua trusts 'o' to name a live bucket, so it looks again
            if tonumber(meta[2]) == tonumber(bucket) then redis.call('HDEL', key, 'o') end
          elseif meta[2] and tonumber(bucket) < tonumber(meta[2]) then
            redis.call('HSET', key, 'o', bucket)
          end
          if meta[1] then redis.call('HINCRBY', key, 't', change) end
          -- What it added must outlive the window. A take-back leaves the key's TTL as it was: it
          -- had one, or the HINCRBY above made it and the HDEL emptied it away.
          if delta > 0 then redis.call('EXPIRE', key, ttl) end
        end
      elseif delta > 0 or redis.call('EXISTS', key) == 1 then
        local v = redis.call('INCRBY', key, ARGV[a + 2])
        if v < 0 then redis.call('SET', key, '0', 'KEEPTTL') end
        if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
      end
    end
  end
end

if f == 0 then return {1, settled, 0} end
local base = 6 + n * 4
-- Whether this makes the hash, without a call of its own: every event adds at least 1 to its
-- model's requests field, the first pair, so that field's new count equals the increment only when
-- the field is new, and the hash is new only if the field is then all it holds.
local first = tonumber(ARGV[base + 2])
local created = 0
if first < 1 then created = redis.call('EXISTS', KEYS[3]) == 0 and 1 or 0 end
for j = 1, f do
  local v = redis.call('HINCRBY', KEYS[3], ARGV[base + (j - 1) * 2 + 1], ARGV[base + (j - 1) * 2 + 2])
  if j == 1 and first >= 1 and v == first and redis.call('HLEN', KEYS[3]) == 1 then created = 1 end
end
-- One hash per day: its TTL counts from the day's first event.
if created == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
return {1, settled, created}
