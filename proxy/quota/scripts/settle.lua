--[[ settle.lua: replace one admission's reservation with its actual usage, once.

The reservation record written by admit.lua is deleted first; if it is already gone (settled
before, or expired) nothing changes and the script returns 0. Counters are adjusted in the same
buckets and periods the reservation was counted in and never go below 0. Time is ARGV `now`, the
proxy's clock, as in admit.lua.

KEYS[1]       the reservation record
KEYS[2..n+1]  the n distinct counters of the reservation (same keys admit.lua got)
ARGV[1]  now          unix seconds
ARGV[2]  request_id   the lease member to release
ARGV[3]  n            counters
then n quadruples, one per counter: kind ("w" | "p" | "l"), delta (actual - reserved),
  bucket second (the admission's floor(now), used by "w"), ttl seconds

Returns 1 if settled now, 0 if it had been settled already (or its record expired).
]]

if redis.call('DEL', KEYS[1]) == 0 then return 0 end

local low = math.floor(tonumber(ARGV[1])) - 59
local n = tonumber(ARGV[3])
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local kind, delta, bucket, ttl = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
  local key = KEYS[i + 1]
  if kind == 'l' then
    redis.call('ZREM', key, ARGV[2])
  elseif delta ~= 0 then
    if kind == 'w' then
      -- A bucket already out of the window counts for nothing: leave it be.
      if tonumber(bucket) >= low then
        local v = redis.call('HINCRBY', key, bucket, ARGV[a + 2])
        if v <= 0 then redis.call('HDEL', key, bucket) end
        if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
      end
    elseif delta > 0 or redis.call('EXISTS', key) == 1 then
      local v = redis.call('INCRBY', key, ARGV[a + 2])
      if v < 0 then redis.call('SET', key, '0', 'KEEPTTL') end
      if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
    end
  end
end
return 1
