-- Governor gate for a batch of intents: applies the risk rules' plan atomically, if it is still current.
-- KEYS[1] kill switch, KEYS[2] daily counter, KEYS[3] counted-intents hash, KEYS[4] intent stream,
-- KEYS[5] risk epoch, KEYS[6] in-flight orders hash, KEYS[7] throttle sorted set, KEYS[8] trading state hash,
-- KEYS[9] equity peaks hash, KEYS[10] trading-state stream.
-- ARGV: group, consumer, ttl_s, lowest id, highest id, the epoch the plan was computed at,
--   one MessagePack array of {intent id, verdict, in-flight text, throttle member ("" without a throttle)}
--   per intent,
--   now (ms), throttle window (ms), MessagePack flat list of trading-state fields to store (empty: unchanged),
--   MessagePack flat list of the state change's stream fields (empty: none), MessagePack flat list of
--   quote asset / new peak pairs, the state stream's MAXLEN, the trading state as read (ARGV[14]), the daily limit.
-- ARGV[6] empty: no rule of the book is configured, so the plan rests on the trading state and the daily count
-- alone; the state must still be the one read (else RETRY) and the daily limit is enforced here.
-- The plan (``risk.decide``) was computed in the client from a snapshot read at ARGV[6]: every write the
-- rules read bumps the epoch, so a plan is applied only while the state it saw still stands; otherwise
-- the reply is "RETRY" and nothing is written (the client reads again).
-- Trading is allowed only while the kill switch is exactly "0" (a key of another type halts, never errors),
-- checked here for every intent, even counted ones. An intent is counted once: the counted hash remembers
-- it until its result is committed (commit.lua gives back the count of one that ends without an order,
-- and removes its in-flight record).
-- An intent no longer pending on this consumer (finished, or taken over) is GONE and not counted.
-- Returns one verdict per intent: APPROVED, GONE, KILL_SWITCH, THROTTLED or a rule's code.
-- KEYS[11] (with ARGV[16], QT_PARTITIONS > 1): the lease of the batch's partition and what it holds while this
-- process owns the partition; held by anyone else (taken over), every intent is GONE and nothing is written:
-- the new holder handles them, in order.
local group, consumer = ARGV[1], ARGV[2]
if ARGV[16] and ARGV[16] ~= '' and redis.call('GET', KEYS[11]) ~= ARGV[16] then
  local gone = {}
  for i = 1, #cmsgpack.unpack(ARGV[7]) do gone[i] = 'GONE' end
  return gone
end
local ttl, low, high = tonumber(ARGV[3]), ARGV[4], ARGV[5]
if ARGV[6] ~= '' then
  if (redis.call('GET', KEYS[5]) or '0') ~= ARGV[6] then return 'RETRY' end
else
  -- No rule of the book: the plan rests on the trading state (checked here) and the daily count
  -- (enforced below).
  local kind = redis.call('TYPE', KEYS[8])['ok']
  local seen = '<' .. kind .. '>'
  if kind == 'hash' then seen = redis.call('HGET', KEYS[8], 'state') or '' end
  if seen ~= ARGV[14] then return 'RETRY' end
end
local limit = tonumber(ARGV[15])
local items = cmsgpack.unpack(ARGV[7])
local now, window = tonumber(ARGV[8]), tonumber(ARGV[9])
local state = cmsgpack.unpack(ARGV[10])
local change = cmsgpack.unpack(ARGV[11])
local peaks = cmsgpack.unpack(ARGV[12])
local out = {}
local changed = false

if #state > 0 then
  redis.call('DEL', KEYS[8])
  redis.call('HSET', KEYS[8], unpack(state))
  changed = true
end
if #change > 0 then
  redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[13], '*', unpack(change))
end
if #peaks > 0 then
  redis.call('HSET', KEYS[9], unpack(peaks))
  changed = true
end

if #items > 0 then
  -- Which of these are still pending on this consumer: paged range queries over the batch's ids, so a
  -- consumer holding many more entries in that range (after an outage) still finds its own.
  local mine = {}
  local page = #items * 4 + 1000
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
  -- item[5], when present: what the intent is counted and held in flight by (its id and its partition's stream).
  local records = {}
  for i, item in ipairs(items) do records[i] = item[5] or item[1] end
  local seen = redis.call('HMGET', KEYS[3], unpack(records))
  local count = tonumber(redis.call('GET', KEYS[2]) or '0')
  local counted, inflight, orders = {}, {}, {}
  for i, item in ipairs(items) do
    local id, verdict, rec = item[1], item[2], records[i]
    if not mine[id] then
      out[i] = 'GONE'
    elseif kill ~= '0' then
      out[i] = 'KILL_SWITCH'
    elseif verdict ~= 'APPROVED' then
      out[i] = verdict
    elseif not seen[i] and count >= limit then
      out[i] = 'DAILY_LIMIT'
    else
      if not seen[i] then
        count = count + 1
        counted[#counted + 1] = rec
        counted[#counted + 1] = '1'
        inflight[#inflight + 1] = rec
        inflight[#inflight + 1] = item[3]
        if item[4] ~= '' then
          orders[#orders + 1] = now
          orders[#orders + 1] = item[4]
        end
      end
      out[i] = 'APPROVED'
    end
  end
  if #counted > 0 then
    redis.call('HSET', KEYS[3], unpack(counted))
    redis.call('SET', KEYS[2], count, 'EX', ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
    redis.call('HSET', KEYS[6], unpack(inflight))
    if #orders > 0 then redis.call('ZADD', KEYS[7], unpack(orders)) end
    changed = true
  end
end
-- Orders leave the set ten windows after they left the window (the rules count only those inside it:
-- no epoch bump needed). Not at the window itself: a gate that read its clock a few ms before this one
-- and its snapshot after this call must still find every order of its own window, or it passes the rate.
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. (now - 10 * window))
if changed then redis.call('INCR', KEYS[5]) end
return out
