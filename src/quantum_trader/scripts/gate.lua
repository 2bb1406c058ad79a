-- Governor gate for a batch of intents: kill switch and daily limit, atomically.
-- KEYS[1] kill switch, KEYS[2] daily counter, KEYS[3] counted-intents hash, KEYS[4] intent stream
-- ARGV: group, limit, ttl_s, then intent ids.
-- Trading is allowed only while the kill switch is exactly "0".
-- An intent is counted once: the counted hash remembers it until its result is committed.
-- An intent no longer pending (finished by another consumer) is reported GONE, not counted.
-- Returns one verdict per intent: "APPROVED", "KILL_SWITCH", "DAILY_LIMIT" or "GONE".
local group = ARGV[1]
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local kill = redis.call('GET', KEYS[1])
local out = {}
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
local touched = false
for i = 4, #ARGV do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', KEYS[4], group, id, id, 1)
  if #pending == 0 then
    out[#out + 1] = 'GONE'
  elseif kill ~= '0' then
    out[#out + 1] = 'KILL_SWITCH'
  elseif redis.call('HEXISTS', KEYS[3], id) == 1 then
    out[#out + 1] = 'APPROVED'
  elseif count >= limit then
    out[#out + 1] = 'DAILY_LIMIT'
  else
    count = count + 1
    redis.call('HSET', KEYS[3], id, '1')
    out[#out + 1] = 'APPROVED'
    touched = true
  end
end
if touched then
  redis.call('SET', KEYS[2], count, 'EX', ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return out
