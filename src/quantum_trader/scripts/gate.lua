-- Governor gate for a batch of intents: kill switch and daily limit, atomically.
-- KEYS[1] kill switch, KEYS[2] daily counter, KEYS[3] counted-intents hash, KEYS[4] intent stream
-- ARGV: group, consumer, limit, ttl_s, lowest id, highest id, and the intent ids as one MessagePack array.
-- Trading is allowed only while the kill switch is exactly "0" (a key of another type halts, never errors).
-- An intent is counted once: the counted hash remembers it until its result is committed.
-- The kill switch is checked first, even for counted intents (never approve while it is not "0");
-- commit.lua gives back the count of an intent that then ends without an order.
-- An intent no longer pending on this consumer (finished, or taken over by another consumer)
-- is reported GONE and not counted: whoever holds it now will gate it.
-- Returns one verdict per intent: "APPROVED", "KILL_SWITCH", "DAILY_LIMIT" or "GONE".
local group, consumer = ARGV[1], ARGV[2]
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local low, high = ARGV[5], ARGV[6]
local ids = cmsgpack.unpack(ARGV[7])
local out = {}
if #ids == 0 then return out end

-- Range queries over the batch's ids: which of these are still pending on this consumer. Paged, so
-- a consumer holding many more entries in that range (after an outage) still finds its own.
local mine = {}
local page = #ids * 4 + 1000
local start = low
while true do
  local rows = redis.call('XPENDING', KEYS[4], group, start, high, page, consumer)
  for _, entry in ipairs(rows) do
    mine[entry[1]] = true
  end
  if #rows < page then break end
  start = '(' .. rows[#rows][1]
end
-- pcall: GET on a list (say) answers an error table instead of failing the batch.
local kill = redis.pcall('GET', KEYS[1])
if type(kill) ~= 'string' then kill = false end
local seen = redis.call('HMGET', KEYS[3], unpack(ids))
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
local counted = {}
for i, id in ipairs(ids) do
  if not mine[id] then
    out[i] = 'GONE'
  elseif kill ~= '0' then
    out[i] = 'KILL_SWITCH'
  elseif seen[i] then
    out[i] = 'APPROVED'
  elseif count >= limit then
    out[i] = 'DAILY_LIMIT'
  else
    count = count + 1
    counted[#counted + 1] = id
    counted[#counted + 1] = '1'
    out[i] = 'APPROVED'
  end
end
if #counted > 0 then
  redis.call('HSET', KEYS[3], unpack(counted))
  redis.call('SET', KEYS[2], count, 'EX', ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return out
