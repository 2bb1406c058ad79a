-- Execution batch commit: acknowledge each intent and write its one result, atomically.
-- KEYS[1] intent stream, KEYS[2] result stream, KEYS[3] counted-intents hash, KEYS[4] daily counter,
-- KEYS[5] the book's positions hash, KEYS[6] the paper exchange's set of unfinished order records,
-- KEYS[7] the gate's in-flight orders hash, KEYS[8] the risk epoch, KEYS[9] today's realised PnL hash,
-- KEYS[10] losing exits sorted set, KEYS[11] protective stops hash,
-- KEYS[12] legacy result stream (optional: dual write when present).
-- ARGV: group, event_type, timestamp, source, one MessagePack array holding, per intent:
--   entry_id, trace_id, correlation_id, payload, placed ("1" when the order reached the exchange),
--   record (the key of the exchange's record of the order, "" for none);
-- ARGV[6], the seconds a record is kept once the intent is finished;
-- ARGV[7], one MessagePack array of position updates {symbol, expected, new, {intent ids of its fills},
--   realised PnL of the fills, quote asset, {losing exits' members}, stop} (stop: the position's
--   protective levels as JSON, "" to remove them, "-" to leave them):
--   the book's position of each symbol filled in this batch, computed by the client from the value it
--   read (expected, "" when absent). Written only when every expected value still stands and every
--   intent with a fill is still pending (its result is written here): the position always agrees
--   with the results (ARGV[8] and ARGV[9]: the lowest and highest of those ids). Otherwise nothing is written and the reply is the list of intent ids no
--   longer pending (possibly empty): the client reads the positions again and recomputes.
-- (One packed argument instead of five per intent: the client spent more time packing thousands of
-- arguments than the server spends unpacking one.)
-- The XACK gates the write: an intent another consumer already finished gets no second result.
-- An intent the gate counted that ends without reaching the exchange (kill switch turned on, expired
-- after a crash between gate and order) gives its count back, so the counter equals orders sent.
-- A record is needed only while the intent may be delivered again; once it is acknowledged (here
-- or by whoever finished it first) the record gets an expiry, so finished orders do not pile up.
-- ARGV[10] now (ms), ARGV[11] oldest losing exit kept (ms), ARGV[12] seconds today's realised PnL is kept,
-- ARGV[13] MessagePack array of {symbol, exit identity}: protective exits that ended without selling all they
-- were to sell; the symbol's levels, if still fired by that exit, are armed again.
-- Every intent's in-flight record (the gate's) goes, and the risk epoch moves: the rules read all of it.
-- Returns the number of results written (or, above, the ids that stopped a position update).
local group, event_type, stamp, source = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local items = cmsgpack.unpack(ARGV[5])
local keep = tonumber(ARGV[6])
local book = cmsgpack.unpack(ARGV[7])
if #book > 0 then
  -- Which of the filled intents are still pending in the group: one paged range query over the
  -- batch's ids (ARGV[8] lowest, ARGV[9] highest) rather than a query per intent.
  local pending, page, start = {}, 1000, ARGV[8]
  while true do
    local rows = redis.call('XPENDING', KEYS[1], group, start, ARGV[9], page)
    for _, row in ipairs(rows) do pending[row[1]] = true end
    if #rows < page then break end
    start = '(' .. rows[#rows][1]
  end
  local stale, gone = false, {}
  for _, update in ipairs(book) do
    if (redis.call('HGET', KEYS[5], update[1]) or '') ~= update[2] then stale = true end
    for _, id in ipairs(update[4]) do
      if not pending[id] then gone[#gone + 1] = id end
    end
  end
  if stale or #gone > 0 then return gone end
  for _, update in ipairs(book) do
    redis.call('HSET', KEYS[5], update[1], update[3])
    if update[5] ~= '0' and update[6] ~= '' then
      redis.call('HINCRBYFLOAT', KEYS[9], update[6], update[5])
      redis.call('EXPIRE', KEYS[9], ARGV[12])
    end
    for _, member in ipairs(update[7]) do
      redis.call('ZADD', KEYS[10], ARGV[10], member)
    end
    if update[8] == '' then
      redis.call('HDEL', KEYS[11], update[1])
    elseif update[8] ~= '-' then
      redis.call('HSET', KEYS[11], update[1], update[8])
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', '(' .. ARGV[11])
end
-- ARGV[14], when present: MessagePack array of what the gate counted each intent by (its id and its
-- partition's stream); without it, the intent ids.
local records = ARGV[14] and cmsgpack.unpack(ARGV[14]) or nil
local written, finished = 0, {}
for pos = 1, #items, 6 do
  local id = items[pos]
  local rec = records and records[(pos - 1) / 6 + 1] or id
  finished[#finished + 1] = rec
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    local fields = {'event_type', event_type, 'payload', items[pos + 3], 'trace_id', items[pos + 1],
                    'correlation_id', items[pos + 2], 'timestamp', stamp, 'source', source}
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    if KEYS[12] then redis.call('XADD', KEYS[12], '*', unpack(fields)) end
    local was_counted = redis.call('HDEL', KEYS[3], rec) == 1
    -- DECR keeps the key's expiry; never below zero (an expired counter is not recreated).
    if was_counted and items[pos + 4] ~= '1' and tonumber(redis.call('GET', KEYS[4]) or '0') > 0 then
      redis.call('DECR', KEYS[4])
    end
    written = written + 1
  end
  -- Not pending any more either way: nothing can ask for the record after the grace period.
  local record = items[pos + 5]
  if record ~= '' then
    redis.call('EXPIRE', record, keep)
    redis.call('SREM', KEYS[6], record)
  end
end
if #finished > 0 then redis.call('HDEL', KEYS[7], unpack(finished)) end
for _, rearm in ipairs(cmsgpack.unpack(ARGV[13])) do
  local raw = redis.call('HGET', KEYS[11], rearm[1])
  if raw then
    local ok, stop = pcall(cjson.decode, raw)
    if ok and type(stop) == 'table' and stop.fired == rearm[2] then
      stop.fired, stop.fired_at, stop.kind = '', '', ''
      redis.call('HSET', KEYS[11], rearm[1], cjson.encode(stop))
    end
  end
end
redis.call('INCR', KEYS[8])
return written
