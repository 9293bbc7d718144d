const GREETINGS = { en: 'Hello', fr: 'Bonjour', de: 'Hallo' };

export const handler = async (event) => {
  const raw = event.isBase64Encoded ? Buffer.from(event.body, 'base64').toString('utf8') : event.body;
  const { name } = JSON.parse(raw ?? '{}');
  const langs = (event.queryStringParameters?.lang ?? 'en').split(',');
  const cookies = Object.fromEntries((event.cookies ?? []).map((c) => c.split('=')));
  return {
    statusCode: 200,
    headers: { 'content-type': 'application/json' },
    cookies: [`last_greeted=${name.split(' ')[0]}; Path=/; HttpOnly`],
    body: JSON.stringify({
      greetings: langs.map((lang) => `${GREETINGS[lang]} ${name}`),
      method: event.requestContext.http.method,
      sourceIp: event.requestContext.http.sourceIp,
      theme: cookies.theme ?? null,
    }),
  };
};
