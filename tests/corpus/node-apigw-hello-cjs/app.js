/**
 * sam init's Node.js hello world (CommonJS).
 *
 * @param {Object} event - API Gateway Lambda Proxy Input Format
 * @param {Object} context - Lambda context
 * @returns {Object} object - API Gateway Lambda Proxy Output Format
 */
let response;

exports.lambdaHandler = async (event, context) => {
    try {
        response = {
            'statusCode': 200,
            'body': JSON.stringify({
                message: 'hello world',
            })
        }
    } catch (err) {
        console.log(err);
        return err;
    }

    return response
};
